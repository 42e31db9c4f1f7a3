"""Low-shot evaluation of frozen features: the MSN logistic-regression protocol.

The protocol (Assran et al., 2022, "Masked Siamese Networks for Label-Efficient Learning"):

1. Extract features of a frozen encoder for a labelled train set and a held-out test set.
2. For ``k`` images per class (default 1, 2, 5) and three fixed splits (seeds 0, 1, 2), sample a
   labelled subset of the train set with exactly ``k`` examples of every class.
3. Centre every feature row with the mean of the *training* features (the sampled subset) and
   L2-normalise each row.
4. Fit a multinomial logistic regression with an L2 penalty and no intercept, minimising

       (1/n) * sum_i CE(y_i, W x_i) + (lambd_eff / 2) * ||W||_F^2,   lambd_eff = lambd / n,

   where ``n`` is the number of training samples (the official code used cyanure with
   ``lambd /= len(embs)``; its README uses ``--lambd 0.0025``).
5. Report test accuracy (percent) as mean +- std over the splits.

The solver here is scikit-learn's ``LogisticRegression`` (L-BFGS) with ``C`` chosen so that it
minimises exactly the objective above; see :func:`fit_logistic`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from msn.eval.splits import (
    DEFAULT_SEEDS,
    DEFAULT_SHOTS,
    check_labels,
    lowshot_splits,
    sample_k_per_class,
    shot_label,
)

#: Regularisation of the official low-shot runs (MSN README: ``--lambd 0.0025``).
DEFAULT_LAMBD = 0.0025


def _check_features(x: np.ndarray, name: str) -> np.ndarray:
    """Return ``x`` as a 2-D array; reject non-finite values (e.g. a diverged encoder)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_pair(x: np.ndarray, y: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    x = _check_features(x, f"{split}_x")
    y = check_labels(y, f"{split}_y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{split}_x has {x.shape[0]} rows but {split}_y has {y.shape[0]} labels")
    return x, y


def _check_lambd(lambd: float) -> None:
    if not np.isfinite(lambd) or lambd <= 0:
        raise ValueError(f"lambd must be a finite positive number, got {lambd}")


CENTERINGS = ("row", "train_mean")


def preprocess(
    train_x: np.ndarray, test_x: np.ndarray, centering: str = "row"
) -> tuple[np.ndarray, np.ndarray]:
    """Centre, then L2-normalise every row (float64 copies; the inputs are not modified).

    ``centering="row"`` (the official protocol: cyanure's ``preprocess(centering=True,
    columns=False)``) subtracts from each feature vector its own mean over dimensions, so train
    and test rows are treated identically and independently. ``"train_mean"`` subtracts the
    mean train vector from both sets instead (a common alternative). Rows that are zero after
    centring stay zero instead of dividing by zero.
    """
    if centering not in CENTERINGS:
        raise ValueError(f"centering={centering!r} is unknown; allowed: {', '.join(CENTERINGS)}")
    train_x = _check_features(train_x, "train_x")
    test_x = _check_features(test_x, "test_x")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_x and test_x have different feature dims: {train_x.shape[1]} vs {test_x.shape[1]}"
        )
    mean = train_x.mean(axis=0, dtype=np.float64)

    def _centre_normalise(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - (x.mean(axis=1, keepdims=True) if centering == "row" else mean)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norms > 0, norms, 1.0)

    return _centre_normalise(train_x), _centre_normalise(test_x)


def fit_logistic(
    train_x: np.ndarray,
    train_y: np.ndarray,
    lambd: float = DEFAULT_LAMBD,
    max_iter: int = 1000,
    *,
    tol: float = 1e-10,
) -> LogisticRegression:
    """Fit the MSN low-shot classifier: multinomial logistic regression, L2, no intercept.

    It minimises ``(1/n) sum_i CE(y_i, W x_i) + (lambd / (2 n)) ||W||_F^2`` over ``W``
    (``n = len(train_y)``). The features are used as given; call :func:`preprocess` first.

    Args:
        train_x: ``(n, D)`` features.
        train_y: ``(n,)`` integer labels, at least two distinct classes.
        lambd: regularisation before the division by ``n`` (the official ``--lambd``).
        max_iter: L-BFGS iteration cap.
        tol: L-BFGS gradient tolerance. It must be tiny because sklearn averages the loss over
            samples: the gradient at ``W = 0`` is only about ``1 / num_classes`` in size, so
            sklearn's default ``1e-4`` can stop at the first iterate.

    Returns:
        The fitted ``LogisticRegression``. With three or more classes ``coef_`` is ``W``
        ``(num_classes, D)``. With two classes sklearn fits a binary model whose ``coef_``
        ``(1, D)`` equals ``W[1] - W[0]`` of the multinomial solution (see below).
    """
    _check_lambd(lambd)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    train_x, train_y = _check_pair(train_x, train_y, "train")
    n_classes = np.unique(train_y).size
    if n_classes < 2:
        raise ValueError(f"logistic regression needs at least 2 classes, got {n_classes}")

    # Matching sklearn's objective to the MSN/cyanure one:
    #   sklearn minimises    C * sum_i CE(y_i, W x_i) + 1/2 ||W||^2.
    #   Dividing by C*n (same minimiser): (1/n) sum_i CE + 1/(2 C n) ||W||^2.
    #   MSN minimises        (1/n) sum_i CE + (lambd_eff / 2) ||W||^2, lambd_eff = lambd / n.
    #   Equating the penalties: 1/(C n) = lambd / n  =>  C = 1 / lambd (independent of n).
    # Two classes: sklearn fits one vector v with a sigmoid instead of softmax rows (w0, w1).
    # The multinomial optimum has w0 = -w1 (shifting both rows by the same vector leaves the
    # softmax unchanged, and the L2 penalty is smallest when they sum to zero), so v = w1 - w0
    # and ||W||^2 = ||v||^2 / 2: the penalty on v is half as large, i.e. C = 2 / lambd.
    C = (2.0 if n_classes == 2 else 1.0) / lambd
    clf = LogisticRegression(C=C, fit_intercept=False, tol=tol, max_iter=max_iter)
    # float64 so that L-BFGS can actually reach the small tolerance.
    clf.fit(train_x.astype(np.float64, copy=False), train_y)
    return clf


def lowshot_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int,
    seed: int,
    lambd: float = DEFAULT_LAMBD,
) -> float:
    """Test accuracy (percent) of one low-shot split: ``k`` train images per class, ``seed``.

    The ``k``-shot subset is drawn from ``train_x`` with :func:`sample_k_per_class`, rows are
    prepared by :func:`preprocess` (official row centring), then the classifier of
    :func:`fit_logistic` is evaluated on the whole test set.
    """
    _check_lambd(lambd)
    train_x, train_y = _check_pair(train_x, train_y, "train")
    test_x, test_y = _check_pair(test_x, test_y, "test")
    idx = sample_k_per_class(train_y, k, seed)
    return subset_accuracy(train_x, train_y, test_x, test_y, idx, (lambd,))[0]


def subset_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    idx: np.ndarray,
    lambdas: Sequence[float] = (DEFAULT_LAMBD,),
) -> list[float]:
    """Test accuracy (percent) of the classifier fitted on the train rows ``idx``, per lambda.

    The rows are prepared once by :func:`preprocess` (official row centring); one classifier of
    :func:`fit_logistic` is fitted for every value in ``lambdas`` and evaluated on the whole test
    set. Inputs are used as given (validate them with the callers' checks).
    """
    x_tr, x_te = preprocess(train_x[idx], test_x)
    return [
        float(100.0 * np.mean(fit_logistic(x_tr, train_y[idx], lambd=lam).predict(x_te) == test_y))
        for lam in lambdas
    ]


def _check_train_test(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validated train and test pairs with the same feature dimension."""
    train_x, train_y = _check_pair(train_x, train_y, "train")
    test_x, test_y = _check_pair(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_x and test_x have different feature dims: {train_x.shape[1]} vs {test_x.shape[1]}"
        )
    return train_x, train_y, test_x, test_y


def lowshot_eval_splits(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    splits: Mapping[str, Sequence[np.ndarray]],
    lambdas: Sequence[float] = (DEFAULT_LAMBD,),
    progress: bool = False,
) -> dict[float, dict[str, tuple[float, float]]]:
    """Accuracy of every split in ``splits`` (e.g. from :func:`lowshot_splits`), per lambda.

    Args:
        splits: ``{column: [train indices of each split]}``; a column with a single split (an
            official subset file) gets std 0.
        lambdas: regularisation values; every split is evaluated with each of them.

    Returns:
        ``{lambd: {column: (mean, std)}}`` in percent (population std), columns in the order
        of ``splits``.
    """
    if len(splits) == 0 or len(lambdas) == 0:
        raise ValueError("splits and lambdas must be non-empty")
    for lam in lambdas:
        _check_lambd(lam)
    train_x, train_y, test_x, test_y = _check_train_test(train_x, train_y, test_x, test_y)
    total = sum(len(v) for v in splits.values())
    bar = tqdm(total=total, desc="low-shot", disable=not progress, leave=False)
    accs: dict[str, list[list[float]]] = {}
    for name, idxs in splits.items():
        if len(idxs) == 0:
            raise ValueError(f"low-shot column {name!r} has no splits")
        accs[name] = []
        for idx in idxs:
            accs[name].append(subset_accuracy(train_x, train_y, test_x, test_y, idx, lambdas))
            bar.update()
    bar.close()
    return {
        float(lam): {
            name: (float(np.mean([a[j] for a in rows])), float(np.std([a[j] for a in rows])))
            for name, rows in accs.items()
        }
        for j, lam in enumerate(lambdas)
    }


def lowshot_eval(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    lambd: float = DEFAULT_LAMBD,
    progress: bool = False,
) -> dict[int, tuple[float, float]]:
    """Low-shot accuracy for every ``k`` in ``shots``, over the splits ``seeds``.

    Returns:
        ``{k: (mean, std)}`` in percent, with ``np.mean`` / ``np.std`` (population std,
        ``ddof=0``) over the per-seed accuracies of :func:`lowshot_accuracy`.
    """
    if len(shots) == 0 or len(seeds) == 0:
        raise ValueError("shots and seeds must be non-empty")
    _check_lambd(lambd)
    # Validate once up front so a bad input fails before any (slow) fit.
    train_x, train_y, test_x, test_y = _check_train_test(train_x, train_y, test_x, test_y)
    splits = lowshot_splits(train_y, shots, (), seeds)  # raises for a bad k, naming the class
    table = lowshot_eval_splits(train_x, train_y, test_x, test_y, splits, [lambd], progress=progress)
    return {int(k): table[float(lambd)][shot_label(k)] for k in shots}


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def format_table(
    results: Mapping[str, Mapping[int | str, tuple[float, float]]],
    title: str | None = None,
) -> str:
    """Render ``{row name: {column: (mean, std)}}`` as an aligned markdown table.

    Rows are the feature sets in insertion order. Integer columns are shot counts ``k``: shown
    as ``k=1``, ``k=2``, ... in increasing order. String columns (``"k=1"``, ``"1%"``, a subset
    file stem, ...) are shown as they are, in order of first appearance; integer columns come
    first when both kinds are mixed. Cells are ``"63.2 ± 1.1"`` (percent, one decimal); a
    missing column shows ``"-"``. The output is valid markdown and also reads well as plain
    text in a terminal.
    """
    keys = [k for row in results.values() for k in row]
    shots = sorted({int(k) for k in keys if not isinstance(k, str)})
    named = list(dict.fromkeys(k for k in keys if isinstance(k, str)))
    columns: list[int | str] = [*shots, *named]
    header = ["features"] + [k if isinstance(k, str) else shot_label(k) for k in columns]
    body = [
        [name] + [f"{row[k][0]:.1f} ± {row[k][1]:.1f}" if k in row else "-" for k in columns]
        for name, row in results.items()
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def _line(cells: list[str]) -> str:
        # Names left-aligned, numbers right-aligned so the decimal points line up.
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    # Markdown alignment row: ":---" left, "---:" right; dashes fill the column width.
    rule = (
        "|"
        + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    lines = [_line(header), rule, *(_line(r) for r in body)]
    if title:
        lines = [title, "", *lines]
    return "\n".join(lines)
