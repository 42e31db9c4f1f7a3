"""Image files on disk: decoding into the run's mode, unreadable files skipped and logged, and
the ``imagefolder`` dataset (class sub-folders, or unlabeled)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension, make_dataset

from msn.data.transforms import image_mode

log = logging.getLogger(__name__)

# torchvision's list (which lacks GIF) plus GIF; matching is case-insensitive (torchvision lower-cases names).
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(sorted(set(IMG_EXTENSIONS) | {".gif"}))
# What an image folder does with a file that cannot be decoded (data.on_bad_image).
ON_BAD_IMAGE: tuple[str, ...] = ("skip", "raise")
# Unreadable files in a row after which a skipping dataset gives up: the folder itself is broken.
_MAX_CONSECUTIVE_BAD = 100
# Files decoded when an image folder is built, so that a folder without a single readable image
# fails before training starts (spread over the sorted file list).
_PROBE_FILES = 16
# Per process, how many unreadable files are warned about one by one (all go to the log file).
_MAX_BAD_IMAGE_WARNINGS = 20


class BadImageError(ValueError):
    """An image file cannot be decoded (truncated, corrupt, empty, not an image)."""


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float grayscale as 8-bit "L", scaled rather than clipped.

    Pillow's own conversion clips such images to 255, which turns a typical 16-bit scan white.
    """
    arr = np.asarray(img, dtype=np.float64)
    low, peak = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (low >= 0.0 and 255.0 < peak <= 65535.0):
        arr = arr / 257.0  # 16-bit range: 65535 -> 255
    elif img.mode == "F" and low >= 0.0 and peak <= 1.0:
        arr = arr * 255.0  # float images in [0, 1]
    elif low < 0.0 or peak > 255.0:
        arr = (arr - low) * (255.0 / max(peak - low, 1e-12))  # unknown range: stretch to 0..255
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img`` in ``mode`` ("RGB" or "L"), whatever its stored mode (CMYK, palette, 16-bit, ...)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit_gray(img)
    elif img.mode == "P" and "transparency" in img.info:
        # Pillow warns on (and may mis-convert) palette transparency unless it goes through RGBA.
        img = img.convert("RGBA")
    return img if img.mode == mode else img.convert(mode)


def load_image(path: str, mode: str) -> Image.Image:
    """Decode ``path`` completely and convert it to ``mode`` ("RGB" or "L").

    Raises:
        BadImageError: the file cannot be decoded; the message names the file and the reason.
    """
    try:
        if os.path.getsize(path) == 0:
            raise BadImageError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as img:
            # Decode now: truncated or corrupt pixel data fails here, not later inside a transform.
            img.load()
            return to_mode(img, mode)
    except BadImageError:
        raise
    except Exception as err:  # any decoder failure means this one file is unusable
        raise BadImageError(f"{path}: {type(err).__name__}: {err}") from err


def read_bad_image_log(path: str | os.PathLike) -> dict[str, str]:
    """``{file: reason}`` from a bad-image log (tab-separated lines; duplicates from several
    worker processes or epochs collapse to one entry). A missing log means no bad file."""
    found: dict[str, str] = {}
    if not os.path.isfile(path):
        return found
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            file, _, reason = line.rstrip("\n").partition("\t")
            if file:
                found.setdefault(file, reason)
    return found


def bad_image_summary(path: str | os.PathLike | None) -> str | None:
    """One line on the unreadable files a run skipped (None when it skipped none)."""
    if path is None:
        return None
    bad = read_bad_image_log(path)
    if not bad:
        return None
    return f"skipped {len(bad)} unreadable image file(s) (list: {path})"


class ImageFolderDataset(Dataset):
    """Image files from disk, labelled by class folder or unlabeled (label ``-1``, empty ``classes``).

    Every file is decoded completely and converted to the run's mode (:func:`to_mode`: CMYK,
    palette, 16-bit and grayscale files all load). A file that cannot be decoded either stops the
    run with :class:`BadImageError` (``on_bad_image="raise"``) or is skipped
    (``on_bad_image="skip"``): the next readable file in the list takes its place, so batches keep
    their size; the file is warned about and appended (``path<TAB>reason``) to ``bad_image_log``,
    which DataLoader worker processes share.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        root: str,
        transform: Callable | None = None,
        in_chans: int = 3,
        on_bad_image: str = "skip",
        bad_image_log: str | os.PathLike | None = None,
    ) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {list(ON_BAD_IMAGE)}, got {on_bad_image!r}")
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.root = root
        self.transform = transform
        self.in_chans = in_chans
        self.on_bad_image = on_bad_image
        self.bad_image_log = None if bad_image_log is None else os.fspath(bad_image_log)
        self._mode = image_mode(in_chans)
        # Indices found unreadable by this process: not decoded again.
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[object, int]:
        # IndexError past the end keeps `for x in dataset` finite (the skip below wraps around).
        index = range(len(self.samples))[index]
        for offset in range(_MAX_CONSECUTIVE_BAD):
            i = (index + offset) % len(self.samples)
            if i in self._bad:
                continue
            path, label = self.samples[i]
            try:
                img = load_image(path, self._mode)
            except BadImageError as err:
                if self.on_bad_image == "raise":
                    raise BadImageError(
                        f"unreadable image {err} (data.on_bad_image=raise; "
                        "data.on_bad_image=skip skips such files)"
                    ) from err
                self._record_bad(i, str(err))
                continue
            return (img if self.transform is None else self.transform(img)), label
        raise BadImageError(
            f"{_MAX_CONSECUTIVE_BAD} image files in a row from {self.samples[index][0]!r} on cannot be "
            f"read (see {self.bad_image_log or 'the warnings above'}); is {self.root!r} damaged?"
        )

    def _record_bad(self, index: int, reason: str) -> None:
        self._bad.add(index)
        path = self.samples[index][0]
        # Workers of an earlier epoch (or another worker) may have listed it: once per run.
        if self.bad_image_log is not None and path in read_bad_image_log(self.bad_image_log):
            return
        if len(self._bad) <= _MAX_BAD_IMAGE_WARNINGS:
            log.warning("skipping unreadable image %s", reason)
            if len(self._bad) == _MAX_BAD_IMAGE_WARNINGS:
                where = f"only listed in {self.bad_image_log}" if self.bad_image_log else "not warned about"
                log.warning("further unreadable images are %s", where)
        if self.bad_image_log is not None:
            # One write per line in append mode: lines from several worker processes do not mix.
            reason = reason.removeprefix(f"{path}: ").replace("\n", " ").replace("\t", " ")
            with open(self.bad_image_log, "a", encoding="utf-8") as f:
                f.write(f"{path}\t{reason}\n")


def _is_image_file(path: str) -> bool:
    # Hidden files (e.g. macOS "._x.jpg" resource forks) carry image extensions but are not images.
    return not os.path.basename(path).startswith(".") and has_file_allowed_extension(path, IMAGE_EXTENSIONS)


def list_images(directory: str) -> list[str]:
    """All image files below ``directory`` (recursive, following links, hidden folders skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if _is_image_file(os.path.join(dirpath, f))]
    return sorted(found)


def _imagefolder_split_dir(root: str, split: str) -> str:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root {root!r} is not an existing folder (dataset imagefolder)")
    if split == "all":
        return root
    if split == "train":
        train = os.path.join(root, "train")
        return train if os.path.isdir(train) else root
    for sub in ("test", "val"):
        if os.path.isdir(os.path.join(root, sub)):
            return os.path.join(root, sub)
    raise FileNotFoundError(
        f"imagefolder split 'test' needs a 'test' or 'val' subfolder of data.root {root!r}; none exists"
    )


def _probe_readable(paths: Sequence[str], mode: str) -> None:
    """Fail now when none of up to ``_PROBE_FILES`` files spread over ``paths`` decodes.

    A few broken files are skipped during training; a folder where not even one of the probed
    files is an image (wrong folder, all files broken) must not start a run.
    """
    picks = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(len(paths), _PROBE_FILES))})
    errors = []
    for i in picks:
        try:
            load_image(paths[i], mode)
            return
        except BadImageError as err:
            errors.append(str(err))
    checked = "all" if len(picks) == len(paths) else f"{len(picks)} (spread over the list)"
    examples = "; ".join(errors[:3])
    raise BadImageError(
        f"no readable image among the {len(paths)} image files found: {checked} checked, none decodes "
        f"(e.g. {examples}). Check data.root."
    )


def build_imagefolder(
    split: str,
    root: str | None,
    transform: Callable | None,
    in_chans: int,
    on_bad_image: str = "skip",
    bad_image_log: str | os.PathLike | None = None,
) -> ImageFolderDataset:
    if root is None:
        raise ValueError("dataset imagefolder needs data.root: the folder that holds the images")
    directory = _imagefolder_split_dir(os.fspath(root), split)

    # torchvision-style class folders: no images directly in the folder and at least two sub-folders with
    # images. A single image-holding sub-folder (e.g. root/images/...) is just nesting, not a labelling.
    has_loose_images = any(e.is_file() and _is_image_file(e.path) for e in os.scandir(directory))
    samples: list[tuple[str, int]] = []
    classes: list[str] = []
    if not has_loose_images:
        try:
            _, class_to_idx = find_classes(directory)
        except FileNotFoundError:  # no sub-folders at all
            class_to_idx = {}
        class_to_idx = {c: i for c, i in class_to_idx.items() if not c.startswith(".")}
        labelled = (
            make_dataset(directory, class_to_idx, is_valid_file=_is_image_file, allow_empty=True)
            if class_to_idx
            else []
        )
        used = sorted({label for _, label in labelled})
        if len(used) >= 2:
            # Drop class folders without images and renumber, so labels are contiguous 0..K-1.
            remap = {old: new for new, old in enumerate(used)}
            idx_to_class = {i: c for c, i in class_to_idx.items()}
            classes = [idx_to_class[old] for old in used]
            samples = [(path, remap[label]) for path, label in labelled]
    if not classes:
        samples = [(path, -1) for path in list_images(directory)]
    if not samples:
        raise ValueError(
            f"no images found under {directory!r} (data.root={root!r}); looked recursively for files with "
            f"extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    _probe_readable([path for path, _ in samples], image_mode(in_chans))
    return ImageFolderDataset(samples, classes, directory, transform, in_chans, on_bad_image, bad_image_log)
