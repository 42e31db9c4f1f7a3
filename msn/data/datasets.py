"""Datasets for MSN pre-training and evaluation.

Every dataset returned by :func:`build_dataset` yields ``(transform(image), label)`` pairs, where
``image`` is a PIL image already in the mode of the run ("L" for ``in_chans=1``, "RGB" for
``in_chans=3``) and ``label`` is an ``int`` class index, or ``-1`` for unlabeled samples. Datasets
with labels expose a ``classes`` list.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from msn.data.decode import ON_BAD_IMAGE
from msn.data.folders import build_imagefolder
from msn.data.transforms import ConvertMode, image_mode

__all__ = [
    "DATASETS",
    "DEFAULT_FASHION_MNIST_DIR",
    "ON_BAD_IMAGE",
    "SPLITS",
    "ArrayImageDataset",
    "build_dataset",
    "has_labels",
    "num_classes",
    "read_idx",
    "stored_targets",
]

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = (
    "digits",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "stl10",
    "imagefolder",
    "hf",
    "litdata",
)
# The formats that hold encoded image files (and so can be decoded on the device).
ENCODED_DATASETS: tuple[str, ...] = ("imagefolder", "hf", "litdata")

# Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the original gzipped IDX files.
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# Relative root for the torchvision-downloaded datasets when data.root is not set.
_DEFAULT_ROOT = "data"

# Allowed values of ``split`` per dataset.
SPLITS: dict[str, tuple[str, ...]] = {
    "digits": ("train", "test", "all"),
    "fashion_mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "labeled", "unlabeled"),
    "imagefolder": ("train", "test", "all"),
    # A Hugging Face dataset names its own splits: checked against them when it is read.
    "hf": (),
    "litdata": ("train", "test", "all"),
}
# Pre-training on STL-10 uses the 100k unlabeled images too; "labeled" is the 5k labelled training images.
_STL10_SPLITS = {"train": "train+unlabeled", "test": "test", "labeled": "train", "unlabeled": "unlabeled"}
_NUM_CLASSES = {"digits": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "stl10": 10}
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX magic numbers: 0x0000 then the element type (0x08 = unsigned byte) then the number of dimensions.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


class ArrayImageDataset(Dataset):
    """Images kept as one ``uint8`` array ``(N, H, W)`` in memory; PIL images are built lazily per item.

    Holding a single array (instead of N PIL objects) keeps start-up fast and lets DataLoader workers share
    the memory after ``fork``.
    """

    def __init__(
        self,
        data: np.ndarray,
        targets: np.ndarray,
        classes: Sequence[str],
        transform: Callable | None = None,
        in_chans: int = 3,
    ) -> None:
        if data.ndim != 3 or data.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array of shape (N, H, W), got {data.dtype} {data.shape}")
        if len(data) != len(targets):
            raise ValueError(f"{len(data)} images but {len(targets)} labels")
        self.data = data
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)
        self.transform = transform
        self.in_chans = in_chans
        self._mode = image_mode(in_chans)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[object, int]:
        img = Image.fromarray(self.data[index], mode="L")
        if self._mode != "L":
            img = img.convert(self._mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def stored_targets(dataset: Dataset) -> Sequence[int] | None:
    """The labels a dataset keeps beside its images (``targets``; ``labels`` in torchvision's
    STL10), or None when it keeps none."""
    targets = getattr(dataset, "targets", None)
    return getattr(dataset, "labels", None) if targets is None else targets


def has_labels(dataset: Dataset) -> bool:
    """Whether *every* sample of ``dataset`` has a class label (a non-empty ``classes`` and no ``-1`` labels).

    STL-10's "train" (train+unlabeled) split therefore has no labels in this sense; use its "labeled" split.
    """
    if not getattr(dataset, "classes", None):
        return False
    targets = stored_targets(dataset)
    if targets is None:
        return True
    return len(targets) > 0 and int(np.min(np.asarray(targets))) >= 0


def num_classes(dataset: Dataset | str) -> int:
    """Number of classes of a dataset object, or of a built-in dataset given by name.

    ``imagefolder`` has no fixed number; pass the dataset object for it.
    """
    if isinstance(dataset, str):
        if dataset not in _NUM_CLASSES:
            raise ValueError(
                f"number of classes of {dataset!r} is not fixed or unknown; known: {sorted(_NUM_CLASSES)} "
                "(for imagefolder pass the dataset object)"
            )
        return _NUM_CLASSES[dataset]
    classes = getattr(dataset, "classes", None)
    if not classes:
        raise ValueError(f"{type(dataset).__name__} has no class labels")
    return len(classes)


def _check_split(name: str, split: str) -> None:
    if SPLITS[name] and split not in SPLITS[name]:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; allowed: {list(SPLITS[name])}")


def _with_mode(transform: Callable | None, in_chans: int) -> Callable:
    """Prepend the mode conversion: torchvision datasets (always RGB) then match ``in_chans``."""
    convert = ConvertMode(image_mode(in_chans))
    return convert if transform is None else _Chain(convert, transform)


class _Chain:
    """Apply two callables in sequence (picklable, unlike a lambda)."""

    def __init__(self, first: Callable, second: Callable) -> None:
        self.first, self.second = first, second

    def __call__(self, x: object) -> object:
        return self.second(self.first(x))

    def __repr__(self) -> str:
        return f"{self.first!r} -> {self.second!r}"


def _missing_dataset_error(name: str, root: str, detail: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} not found under {os.path.abspath(root)!r} ({detail}). Set data.download=true to "
        "download it, or point data.root at a folder that already contains it."
    )


# ----------------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All digits as uint8 images plus the fixed stratified train/test index split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are counts 0..16; scale to the full 8-bit range so normalisation stats behave as usual.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0
    )
    return images, labels, train_idx, test_idx


def _build_digits(split: str, transform: Callable | None, in_chans: int) -> ArrayImageDataset:
    images, labels, train_idx, test_idx = _digits_arrays()
    if split != "all":
        idx = train_idx if split == "train" else test_idx
        images, labels = images[idx], labels[idx]
    return ArrayImageDataset(images, labels, [str(i) for i in range(10)], transform, in_chans)


# ----------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes (the MNIST format) into a numpy array.

    Raises:
        ValueError: the file is not gzip, is truncated, has the wrong magic number or inconsistent sizes.
    """
    path = os.fspath(path)
    st = os.stat(path)
    # Cache on (path, mtime, size) so repeated builds (train, eval, tests) do not decompress again, while a
    # rewritten file is still read afresh.
    return _read_idx_cached(path, st.st_mtime_ns, st.st_size, expected_magic)


@lru_cache(maxsize=4)
def _read_idx_cached(path: str, _mtime: int, _size: int, expected_magic: int) -> np.ndarray:
    hint = "delete it and reinstall (apt-get install --reinstall dataset-fashion-mnist) or re-download it"
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; truncated streams raise EOFError
        raise ValueError(f"corrupt IDX file {path!r}: not a readable gzip file ({e}); {hint}") from e
    if len(raw) < 4:
        raise ValueError(f"corrupt IDX file {path!r}: only {len(raw)} bytes; {hint}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"corrupt IDX file {path!r}: magic number {magic:#010x}, expected {expected_magic:#010x}; {hint}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"corrupt IDX file {path!r}: truncated header; {hint}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(
            f"corrupt IDX file {path!r}: {len(raw)} bytes but header shape {shape} needs {expected}; {hint}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _build_fashion_mnist(
    split: str, root: str | None, transform: Callable | None, download: bool, in_chans: int
) -> ArrayImageDataset:
    classes = tvd.FashionMNIST.classes
    idx_dir = Path(root) if root is not None else Path(DEFAULT_FASHION_MNIST_DIR)
    img_file, lbl_file = (idx_dir / f for f in _FASHION_FILES[split])
    if img_file.is_file() or lbl_file.is_file():
        images = read_idx(img_file, _IDX_IMAGES_MAGIC)  # a missing partner file raises FileNotFoundError
        labels = read_idx(lbl_file, _IDX_LABELS_MAGIC)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"inconsistent Fashion-MNIST files in {str(idx_dir)!r}: images {images.shape}, "
                f"labels {labels.shape}"
            )
        return ArrayImageDataset(images, labels, classes, transform, in_chans)

    # No raw IDX files: use (or download into) torchvision's layout, root/FashionMNIST/raw.
    tv_root = root if root is not None else _DEFAULT_ROOT
    try:
        ds = tvd.FashionMNIST(tv_root, train=split == "train", download=download)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"Fashion-MNIST not found: looked for {_FASHION_FILES[split][0]} in {str(idx_dir)!r} and for "
            f"torchvision's copy under {os.path.abspath(tv_root)!r} ({e}). Fix: apt-get install "
            f"dataset-fashion-mnist (then leave data.root unset: {DEFAULT_FASHION_MNIST_DIR}), or set "
            "data.download=true, or point data.root at a folder with the gzipped IDX files."
        ) from e
    return ArrayImageDataset(ds.data.numpy(), ds.targets.numpy(), classes, transform, in_chans)


# ----------------------------------------------------------------------------------------------------
# torchvision datasets: CIFAR-10/100, STL-10
# ----------------------------------------------------------------------------------------------------
def _build_torchvision(
    name: str, split: str, root: str | None, transform: Callable | None, download: bool, in_chans: int
) -> Dataset:
    root = root if root is not None else _DEFAULT_ROOT
    tf = _with_mode(transform, in_chans)
    try:
        if name == "stl10":
            return tvd.STL10(root, split=_STL10_SPLITS[split], transform=tf, download=download)
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        return cls(root, train=split == "train", transform=tf, download=download)
    except RuntimeError as e:
        # torchvision reports missing/corrupt archives as RuntimeError("Dataset not found or corrupted...").
        raise _missing_dataset_error(name, root, str(e)) from e


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------
def build_dataset(
    name: str,
    split: str = "train",
    root: str | None = None,
    transform: Callable | None = None,
    download: bool = False,
    in_chans: int = 3,
    on_bad_image: str = "skip",
    bad_image_log: str | os.PathLike | None = None,
    decode_on: str = "workers",
    image_key: str = "image",
    label_key: str | None = "label",
    list_cache: str | os.PathLike | None = None,
) -> Dataset:
    """Build a dataset of ``(transform(image), label)`` pairs; ``label`` is ``-1`` for unlabeled samples.

    Args:
        name: One of :data:`DATASETS`.
        split: "train" or "test" for all datasets; also "all" (digits, imagefolder), "labeled"/"unlabeled"
            (stl10, where "train" means train+unlabeled for pre-training).
        root: Data folder. ``None`` means ``"data"`` for torchvision datasets and
            ``/usr/share/datasets/fashion-mnist`` for fashion_mnist; required for imagefolder.
        transform: Applied to the PIL image (already converted to "L" or "RGB" per ``in_chans``).
        download: Let torchvision download missing datasets.
        in_chans: 1 or 3; images are converted to "L" or "RGB".
        on_bad_image: encoded formats (:data:`ENCODED_DATASETS`): ``skip`` (default) or ``raise``
            on an image that cannot be decoded (see :class:`~msn.data.decode.EncodedImages`).
        bad_image_log: encoded formats: file that skipped images are appended to.
        decode_on: encoded formats: ``workers`` (decoded and transformed here) or ``device``
            (samples are the encoded bytes, decoded per batch by :func:`~msn.data.decode.decode_batch`).
        image_key: hf only: the column of the images.
        label_key: hf only: the column of the labels (None or a missing column: unlabeled).
        list_cache: imagefolder only: folder that keeps the file list of a tree between runs.

    Raises:
        BadImageError: an image folder where none of the probed files decodes.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (data.name); allowed: {list(DATASETS)}")
    _check_split(name, split)
    if isinstance(in_chans, bool) or in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
    if root is not None:
        root = os.path.expanduser(os.fspath(root))

    if name == "digits":
        return _build_digits(split, transform, in_chans)
    if name == "fashion_mnist":
        return _build_fashion_mnist(split, root, transform, download, in_chans)
    encoded = {"on_bad_image": on_bad_image, "bad_image_log": bad_image_log, "decode_on": decode_on}
    if name == "imagefolder":
        return build_imagefolder(split, root, transform, in_chans, list_cache=list_cache, **encoded)
    if name == "hf":
        from msn.data.hf import build_hf  # the `datasets` library is an optional extra

        return build_hf(split, root, transform, in_chans, image_key=image_key, label_key=label_key, **encoded)
    if name == "litdata":
        from msn.data.streaming import build_litdata  # litdata is an optional extra

        return build_litdata(split, root, transform, in_chans, **encoded)
    return _build_torchvision(name, split, root, transform, download, in_chans)
