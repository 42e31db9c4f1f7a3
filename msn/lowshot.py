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

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

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
    "lowshot_eval_splits",
    "lowshot_splits",
    "match_subset",
    "percent_counts",
    "percent_label",
    "preprocess",
    "raw_pixel_features",
    "read_subset_file",
    "sample_k_per_class",
    "sample_per_class",
    "sample_percent_per_class",
    "shot_label",
    "subset_accuracy",
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


def _check_percent(percent: float) -> None:
    if (
        isinstance(percent, bool)
        or not isinstance(percent, (int, float, np.integer, np.floating))
        or not np.isfinite(percent)
        or not 0 < percent <= 100
    ):
        raise ValueError(f"percent (lowshot.percents) must be a number in (0, 100], got {percent!r}")


# ----------------------------------------------------------------------------------------------
# Protocol
# ----------------------------------------------------------------------------------------------


def sample_per_class(
    labels: np.ndarray,
    counts: int | Sequence[int] | Callable[[np.ndarray], np.ndarray],
    seed: int,
    *,
    what: str | None = None,
) -> np.ndarray:
    """Indices of the first ``counts[c]`` entries of a seeded permutation of every class ``c``.

    This is the one sampler behind :func:`sample_k_per_class` and
    :func:`sample_percent_per_class`. Every class gets its own permutation (classes in
    increasing order, one generator seeded with ``seed``); the permutations depend only on the
    labels and the seed, never on the counts, so any two subsets drawn with the same seed are
    nested whenever one asks for at most as many images of every class as the other.

    Args:
        labels: ``(N,)`` integer class labels (no ``-1``).
        counts: images to take from every class: one int for all classes, one int per class
            (classes in increasing order), or a function mapping the class sizes ``(C,)`` to
            the counts ``(C,)``.
        seed: the split's seed.
        what: description of the request for the error message (e.g. ``"k=5 images per
            class"``).

    Returns:
        Sorted ``int64`` array of indices into ``labels``.

    Raises:
        ValueError: if a count is negative or larger than its class.
    """
    labels = _check_labels(labels)
    classes, sizes = np.unique(labels, return_counts=True)
    if callable(counts):
        counts = counts(sizes)
    want = np.broadcast_to(np.asarray(counts), sizes.shape)
    if not np.issubdtype(want.dtype, np.integer):
        raise ValueError(f"per-class counts must be integers, got dtype {want.dtype}")
    if (want < 0).any():
        raise ValueError("per-class counts must be >= 0")
    small = np.flatnonzero(sizes < want)
    if small.size:
        c = small[np.argmin(sizes[small])]
        what = what or f"{int(want[c])} images of class {classes[c]}"
        raise ValueError(
            f"cannot sample {what}: class {classes[c]} has only {sizes[c]} example(s) "
            f"({small.size} class(es) have fewer than requested)"
        )
    # A stable argsort groups indices by class in one O(N log N) pass instead of one full scan
    # of the labels per class (which is slow for ImageNet-sized label arrays).
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(sizes)[:-1])
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(idx)[: int(n)] for idx, n in zip(by_class, want, strict=True)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def sample_k_per_class(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of exactly ``k`` examples of every class present in ``labels``.

    Every class gets its own seeded permutation (classes in increasing order, one generator
    seeded with ``seed``) and contributes its first ``k`` entries (see
    :func:`sample_per_class`). Because the permutations do not depend on ``k``, splits are
    nested: with the same seed, the ``k=1`` subset is contained in the ``k=2`` subset, which is
    contained in the ``k=5`` subset (and in every percent subset that takes at least ``k``
    images of every class).

    Returns:
        Sorted ``int64`` array of ``k * num_classes`` indices into ``labels``.

    Raises:
        ValueError: if ``k < 1`` or some class has fewer than ``k`` examples.
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k (images per class) must be a positive integer, got {k}")
    k = int(k)
    return sample_per_class(labels, k, seed, what=f"k={k} images per class")


def percent_counts(sizes: np.ndarray, percent: float) -> np.ndarray:
    """Images per class of a ``percent`` subset: ``round(percent / 100 * size)``, at least 1.

    Rounding is half up (``12.5 -> 13``), computed as ``percent * size / 100`` to avoid
    representation error in ``percent / 100``.
    """
    _check_percent(percent)
    sizes = np.asarray(sizes, dtype=np.int64)
    n = np.floor(float(percent) * sizes / 100.0 + 0.5).astype(np.int64)
    return np.clip(n, 1, sizes)


def sample_percent_per_class(labels: np.ndarray, percent: float, seed: int) -> np.ndarray:
    """Indices of ``percent`` % of every class (:func:`percent_counts` images, at least 1).

    Uses the same per-class permutations as :func:`sample_k_per_class`, so with the same seed a
    ``k``-shot subset is contained in the percent subset whenever the latter takes at least ``k``
    images of every class.

    Raises:
        ValueError: if ``percent`` is not in ``(0, 100]``.
    """
    _check_percent(percent)
    return sample_per_class(labels, lambda sizes: percent_counts(sizes, percent), seed)


def shot_label(k: int) -> str:
    """Column name of a k-shot split: ``1 -> "k=1"``."""
    return f"k={int(k)}"


def percent_label(percent: float) -> str:
    """Column name of a percent subset: ``1 -> "1%"``, ``0.5 -> "0.5%"``."""
    return f"{float(percent):g}%"


def lowshot_splits(
    labels: np.ndarray,
    shots: Sequence[int] = DEFAULT_SHOTS,
    percents: Sequence[float] = (),
    seeds: Sequence[int] = DEFAULT_SEEDS,
) -> dict[str, list[np.ndarray]]:
    """Every seeded split of the protocol: ``{column: [indices per seed]}``.

    Columns in display order: ``"k=1"``, ``"k=2"``, ... for ``shots`` (in the given order), then
    ``"1%"``, ``"10%"``, ... for ``percents``. Raises ``ValueError`` for a bad ``k`` or percent
    before anything is fitted.
    """
    if len(seeds) == 0:
        raise ValueError("seeds must be non-empty")
    for p in percents:
        _check_percent(p)
    splits: dict[str, list[np.ndarray]] = {}
    for k in shots:
        _add_split(splits, shot_label(k), [sample_k_per_class(labels, k, s) for s in seeds])
    for p in percents:
        _add_split(splits, percent_label(p), [sample_percent_per_class(labels, p, s) for s in seeds])
    return splits


def _add_split(splits: dict[str, list[np.ndarray]], name: str, idx: list[np.ndarray]) -> None:
    if name in splits:
        raise ValueError(f"low-shot column {name!r} is requested twice")
    splits[name] = idx


# ----------------------------------------------------------------------------------------------
# Official subset files
# ----------------------------------------------------------------------------------------------


def read_subset_file(path: str | Path, key: str = "lowshot.subset_files") -> list[str]:
    """Image file names of an official subset file: one name per line, blank lines ignored.

    Raises:
        ValueError: if the file does not exist (the message names ``key`` and the path) or
            holds no names.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{key}: no such subset file {str(path)!r}")
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{key}: subset file {str(path)!r} lists no image names")
    return names


def match_subset(names: Sequence[str], paths: Sequence[str], source: str = "subset file") -> np.ndarray:
    """Indices of the samples whose file name (basename of ``paths``) is in ``names``.

    Returns:
        Sorted ``int64`` indices into ``paths`` (a name listed twice counts once).

    Raises:
        ValueError: if some names are not among the file names (the message gives how many and
            the first 5), or a name matches several samples (same file name in two folders).
    """
    index: dict[str, int] = {}
    dupes: set[str] = set()
    for i, p in enumerate(paths):
        base = os.path.basename(os.fspath(p))
        if base in index:
            dupes.add(base)
        index[base] = i
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} of {len(names)} image name(s) are not in the dataset, "
            f"e.g. {missing[:5]}"
        )
    ambiguous = sorted({n for n in names if n in dupes})
    if ambiguous:
        raise ValueError(
            f"{source}: {len(ambiguous)} image name(s) match several dataset files, e.g. {ambiguous[:5]}"
        )
    return np.unique(np.array([index[n] for n in names], dtype=np.int64))


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
