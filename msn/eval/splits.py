"""Which labelled images an evaluation sees: the seeded, nested k-shot and percent splits of the
low-shot protocol, and the official subset files matched to a folder dataset by file name.

Every class gets its own seeded permutation that does not depend on how many images are asked
for, so with the same seed a smaller split is always inside a larger one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from msn.data.datasets import stored_targets

#: Images per class of the official low-shot table.
DEFAULT_SHOTS: tuple[int, ...] = (1, 2, 5)
#: The three fixed splits; fixed seeds make every number in a table reproducible.
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
#: The config key of the subset files, named in their messages.
SUBSET_KEY = "lowshot.subset_files"
NO_LABELS_MSG = "dataset has no labels; low-shot evaluation needs a labelled dataset"


def check_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
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
        raise ValueError(f"{NO_LABELS_MSG} ({n_missing} of {labels.size} {name} are negative)")
    return labels.astype(np.int64, copy=False)


def check_percent(percent: float) -> None:
    if (
        isinstance(percent, bool)
        or not isinstance(percent, (int, float, np.integer, np.floating))
        or not np.isfinite(percent)
        or not 0 < percent <= 100
    ):
        raise ValueError(f"percent (lowshot.percents) must be a number in (0, 100], got {percent!r}")


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
    labels = check_labels(labels)
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
    check_percent(percent)
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
    check_percent(percent)
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
        check_percent(p)
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


def dataset_targets(dataset: Dataset) -> np.ndarray:
    """Class labels ``(N,)`` of a labelled dataset: its ``targets`` (or ``labels``) when it keeps
    them, else read item by item (which decodes every image)."""
    targets = stored_targets(dataset)
    if targets is None or len(targets) != len(dataset):  # type: ignore[arg-type]
        targets = [dataset[i][1] for i in range(len(dataset))]  # type: ignore[arg-type]
    return np.asarray(targets, dtype=np.int64)


def dataset_file_paths(dataset: Dataset) -> list[str] | None:
    """File paths of the samples of a folder dataset (``.samples`` of ``(path, label)``), in order.

    ``torch.utils.data.Subset`` wrappers are followed. ``None`` when the dataset has no file
    names (e.g. the built-in tensor datasets).
    """
    if isinstance(dataset, Subset):
        inner = dataset_file_paths(dataset.dataset)
        return None if inner is None else [inner[int(i)] for i in dataset.indices]
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return None
    try:
        return [os.fspath(sample[0]) for sample in samples]
    except (TypeError, IndexError, KeyError):
        return None


def subset_file_indices(dataset: Dataset, subset_files: Sequence[str | Path]) -> dict[str, np.ndarray]:
    """``{file stem: train indices}`` of official subset files, matched by image file name.

    Raises:
        ValueError: a file is missing or empty, the dataset has no file names, a listed name is
            not in the dataset, or two files share a stem.
    """
    if not subset_files:
        return {}
    lists = {Path(f): read_subset_file(f, SUBSET_KEY) for f in subset_files}  # missing files first
    paths = dataset_file_paths(dataset)
    if paths is None:
        raise ValueError(f"{SUBSET_KEY} needs a dataset with file names (data=imagefolder)")
    out: dict[str, np.ndarray] = {}
    for path, names in lists.items():
        if path.stem in out:
            raise ValueError(f"{SUBSET_KEY}: two subset files share the name {path.stem!r}")
        out[path.stem] = match_subset(names, paths, source=f"{SUBSET_KEY} {str(path)!r}")
    return out


def subsample(dataset: Dataset, max_items: int | None, seed: int) -> Dataset:
    """At most ``max_items`` items of ``dataset`` (None: all): a random subset fixed by ``seed``,
    in dataset order."""
    n = len(dataset)  # type: ignore[arg-type]
    if max_items is None or n <= max_items:
        return dataset
    # A private generator: the global RNG (of a training run) must not move.
    generator = torch.Generator().manual_seed(seed)
    # Sorted indices keep the reads in file order (cheaper on disk-backed image folders).
    indices = torch.randperm(n, generator=generator)[:max_items].sort().values
    return Subset(dataset, indices.tolist())
