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

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

__all__ = [
    "DEFAULT_LAMBD",
    "DEFAULT_SEEDS",
    "DEFAULT_SHOTS",
    "extract_features",
    "fit_logistic",
    "format_table",
    "lowshot_accuracy",
    "lowshot_eval",
    "preprocess",
    "raw_pixel_features",
    "sample_k_per_class",
]

#: Regularisation of the official low-shot runs (MSN README: ``--lambd 0.0025``).
DEFAULT_LAMBD = 0.0025
#: Images per class of the official low-shot table.
DEFAULT_SHOTS: tuple[int, ...] = (1, 2, 5)
#: The three fixed splits; fixed seeds make every number in a table reproducible.
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)

_NO_LABELS_MSG = "dataset has no labels; low-shot evaluation needs a labelled dataset"


# ----------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``encode`` over a dataset of ``(image, label)`` pairs, in dataset order.

    Args:
        encode: maps a batch of images ``(B, ...)`` on ``device`` to features ``(B, D)``. If it
            wraps an ``nn.Module``, the caller must put that module in ``eval()`` mode first;
            this function only disables autograd.
        dataset: map-style dataset whose items are ``(image_tensor, label)`` (extra trailing
            items are ignored). Labels are returned as they are, ``-1`` included: the low-shot
            functions reject unlabelled data, but extracting features of it is not an error.
        batch_size: images per forward pass.
        num_workers: ``DataLoader`` worker processes.
        device: where ``encode`` runs; images are moved there, features come back to the CPU.
        progress: show a tqdm progress bar.
        desc: label of the progress bar.

    Returns:
        ``(features, labels)``: ``float32`` array ``(N, D)`` and ``int64`` array ``(N,)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("cannot extract features of an empty dataset")
    device = torch.device(device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,  # features must stay aligned with dataset indices
        drop_last=False,  # every sample is evaluated
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    feats: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise TypeError("dataset items must be (image, label) pairs")
        images, targets = batch[0], batch[1]
        out = encode(images.to(device, non_blocking=True))
        if out.ndim != 2 or out.shape[0] != images.shape[0]:
            raise ValueError(
                f"encode must return a (batch, dim) tensor, got shape {tuple(out.shape)} "
                f"for a batch of {images.shape[0]} images"
            )
        # float32 on the CPU: half-precision features (autocast) would lose accuracy in the
        # centring/normalisation, and float64 would double the memory of large feature banks.
        feats.append(out.detach().float().cpu().numpy())
        labels.append(torch.as_tensor(targets).long().reshape(-1).cpu().numpy())
    return np.concatenate(feats, axis=0), np.concatenate(labels, axis=0)


def raw_pixel_features(
    dataset: Dataset,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Flattened image tensors as features: the raw-pixel baseline of the low-shot table.

    The images are whatever the dataset's transform yields (so a 224x224 RGB eval transform gives
    150528-dim features; use a small resolution for this baseline).

    Returns:
        ``(features, labels)``: ``float32`` array ``(N, C*H*W)`` and ``int64`` array ``(N,)``.
    """
    return extract_features(
        lambda x: x.flatten(1),
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        device="cpu",
        progress=progress,
        desc="raw pixels",
    )


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as a 1-D int64 array; reject unlabelled (negative) entries."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {labels.dtype}")
    n_missing = int(np.count_nonzero(labels < 0))
    if n_missing:
        # -1 is the convention for unlabelled samples (e.g. an unlabelled pre-training set).
        raise ValueError(f"{_NO_LABELS_MSG} ({n_missing} of {labels.size} {name} are negative)")
    return labels.astype(np.int64, copy=False)


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
    y = _check_labels(y, f"{split}_y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{split}_x has {x.shape[0]} rows but {split}_y has {y.shape[0]} labels")
    return x, y


def _check_lambd(lambd: float) -> None:
    if not np.isfinite(lambd) or lambd <= 0:
        raise ValueError(f"lambd must be a finite positive number, got {lambd}")


# ----------------------------------------------------------------------------------------------
# Protocol
# ----------------------------------------------------------------------------------------------


def sample_k_per_class(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of exactly ``k`` examples of every class present in ``labels``.

    Every class gets its own seeded permutation (classes in increasing order, one generator
    seeded with ``seed``) and contributes its first ``k`` entries. Because the permutations do
    not depend on ``k``, splits are nested: with the same seed, the ``k=1`` subset is contained
    in the ``k=2`` subset, which is contained in the ``k=5`` subset.

    Returns:
        Sorted ``int64`` array of ``k * num_classes`` indices into ``labels``.

    Raises:
        ValueError: if ``k < 1`` or some class has fewer than ``k`` examples.
    """
    labels = _check_labels(labels)
    if int(k) != k or k < 1:
        raise ValueError(f"k (images per class) must be a positive integer, got {k}")
    k = int(k)
    classes, counts = np.unique(labels, return_counts=True)
    small = np.flatnonzero(counts < k)
    if small.size:
        c = small[np.argmin(counts[small])]
        raise ValueError(
            f"cannot sample k={k} images per class: class {classes[c]} has only {counts[c]} "
            f"example(s) ({small.size} class(es) have fewer than {k})"
        )
    # A stable argsort groups indices by class in one O(N log N) pass instead of one full scan
    # of the labels per class (which is slow for ImageNet-sized label arrays).
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(idx)[:k] for idx in by_class]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


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
    x_tr, x_te = preprocess(train_x[idx], test_x)
    clf = fit_logistic(x_tr, train_y[idx], lambd=lambd)
    return float(100.0 * np.mean(clf.predict(x_te) == test_y))


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
    train_x, train_y = _check_pair(train_x, train_y, "train")
    test_x, test_y = _check_pair(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_x and test_x have different feature dims: {train_x.shape[1]} vs {test_x.shape[1]}"
        )
    for k in shots:
        sample_k_per_class(train_y, k, 0)  # raises for a bad k, naming the too-small class

    results: dict[int, tuple[float, float]] = {}
    bar = tqdm(total=len(shots) * len(seeds), desc="low-shot", disable=not progress, leave=False)
    for k in shots:
        accs = []
        for seed in seeds:
            accs.append(lowshot_accuracy(train_x, train_y, test_x, test_y, k, seed, lambd))
            bar.update()
        results[int(k)] = (float(np.mean(accs)), float(np.std(accs)))
    bar.close()
    return results


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def format_table(
    results: Mapping[str, Mapping[int, tuple[float, float]]],
    title: str | None = None,
) -> str:
    """Render ``{row name: {k: (mean, std)}}`` as an aligned markdown table.

    Rows are the feature sets in insertion order, columns the union of all ``k`` in increasing
    order, cells ``"63.2 ± 1.1"`` (percent, one decimal); a missing ``k`` shows ``"-"``. The
    output is valid markdown and also reads well as plain text in a terminal.
    """
    shots = sorted({int(k) for row in results.values() for k in row})
    header = ["features"] + [f"k={k}" for k in shots]
    body = [
        [name] + [f"{row[k][0]:.1f} ± {row[k][1]:.1f}" if k in row else "-" for k in shots]
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
