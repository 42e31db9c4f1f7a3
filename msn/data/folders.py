"""Image files on disk: listing a folder tree and the ``imagefolder`` dataset (class sub-folders,
or unlabeled); decoding and bad files are :mod:`msn.data.decode`'s."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from msn.data.decode import EncodedImages

log = logging.getLogger(__name__)

# torchvision's list (which lacks GIF) plus GIF; matching is case-insensitive (torchvision lower-cases names).
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(sorted(set(IMG_EXTENSIONS) | {".gif"}))


class ImageFolderDataset(EncodedImages, Dataset):
    """Image files from disk, labelled by class folder or unlabeled (label ``-1``, empty ``classes``).

    Every file is decoded completely and converted to the run's mode (:func:`~msn.data.decode.to_mode`:
    CMYK, palette, 16-bit and grayscale files all load), or only read with ``decode_on="device"``;
    unreadable files are skipped or raise as :class:`~msn.data.decode.EncodedImages` says.
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
        decode_on: str = "workers",
    ) -> None:
        self._init_encoded(transform, in_chans, on_bad_image, bad_image_log, decode_on)
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.root = root

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[object, int]:
        # IndexError past the end keeps `for x in dataset` finite (the skip wraps around).
        return self._encoded(range(len(self.samples))[index])

    def _read(self, index: int) -> tuple[str, int, str]:
        path, label = self.samples[index]
        return path, label, path


def _is_image_file(path: str) -> bool:
    # Hidden files (e.g. macOS "._x.jpg" resource forks) carry image extensions but are not images.
    return not os.path.basename(path).startswith(".") and has_file_allowed_extension(path, IMAGE_EXTENSIONS)


def _is_image_name(name: str) -> bool:
    """:func:`_is_image_file` of a bare file name, without its per-path cost (a listing's hot loop)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(directory: str) -> list[str]:
    """All image files below ``directory`` (recursive, following links, hidden folders skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if _is_image_file(os.path.join(dirpath, f))]
    return sorted(found)


# --------------------------------------------------------------------------------------------------------
# Listing an image folder, with the file list cached between runs
# --------------------------------------------------------------------------------------------------------
# Version of the cache file: bump it when the listing rules or the file's layout change, so that
# older files are listed again rather than misread.
_LIST_FORMAT = 1
# A folder modified this shortly before it was listed may change again within the file system's
# timestamp granularity (a clock tick on ext4, 2 s on FAT; a file server's clock may drift too)
# without its mtime moving: such a list is not cached, and the next run lists the tree again
# (git's "racy" rule).
_RACY_NS = 2_000_000_000
# Cache folders that could not be written to, already warned about (once per process).
_UNWRITABLE_CACHES: set[str] = set()


class _Folder(NamedTuple):
    path: str  # as os.walk spells it: os.path.join(directory, ...)
    rel: str  # relative to the listed directory ("" for the directory itself)
    mtime_ns: int
    files: list[str]  # names of the entries that are not folders (os.walk's filenames)
    top: str  # the folder of the directory it lies in (a class folder); "" for the directory itself
    hidden: bool  # a folder on its way below the directory starts with "."


def _walk(directory: str) -> tuple[list[_Folder], bool, bool]:
    """The folders that the imagefolder rules look into, as ``os.walk(followlinks=True)`` visits
    them; returns ``(folders, loose, complete)``.

    ``loose``: the directory holds image files itself (then it is unlabeled, and hidden folders are
    skipped at every depth as :func:`list_images` does; otherwise only at the top, as torchvision's
    class-folder walk does). Each folder is stat-ed *before* it is read, so that a change during the
    walk shows as a newer mtime next time. ``complete`` is false when a folder below could not be
    read (skipped, as os.walk does): such a list is not cached. Errors on the directory itself raise.
    """
    folders: list[_Folder] = []
    loose, complete = False, True
    stack = [(directory, "", "", False)]
    while stack:
        path, rel, top, hidden = stack.pop()
        try:
            mtime_ns = os.stat(path).st_mtime_ns
            dirs, files = [], []
            with os.scandir(path) as entries:
                for entry in entries:
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    (dirs if is_dir else files).append(entry.name)
                    if not rel and not is_dir and not loose:
                        loose = _is_image_name(entry.name) and entry.is_file()
        except OSError as err:
            if not rel:
                raise
            log.debug("skipping the unreadable folder %s: %s", path, err)
            complete = False
            continue
        folders.append(_Folder(path, rel, mtime_ns, files, top, hidden))
        for d in dirs:
            if d.startswith(".") and (loose or not rel):
                continue
            sub = os.path.join(rel, d) if rel else d
            stack.append((os.path.join(path, d), sub, top or d, hidden or (bool(rel) and d.startswith("."))))
    return folders, loose, complete


# One run of samples: (folder index, label, file names), in the order of the samples.
_Run = tuple[int, int, list[str]]


def _runs(folders: list[_Folder], loose: bool) -> tuple[list[_Run], list[str]]:
    """The imagefolder rules on a walked tree: ``(runs, classes)``.

    Class folders (torchvision's order: class, then folder path, then file name) when the directory
    holds no image files itself and at least two of its (non-hidden) sub-folders hold images
    below them; class folders without images are dropped, so labels are 0..K-1. A single
    image-holding sub-folder (e.g. root/images/...) is nesting, not a labelling. Otherwise every
    image outside hidden folders, unlabeled (-1), sorted by path.
    """
    if not loose:
        by_class: dict[str, list[int]] = {}
        for i, f in enumerate(folders):
            if f.top:
                by_class.setdefault(f.top, []).append(i)
        labelled: list[tuple[str, list[tuple[int, list[str]]]]] = []
        for cls in sorted(by_class):
            runs = []
            for i in sorted(by_class[cls], key=lambda i: folders[i].path):
                names = sorted(n for n in folders[i].files if _is_image_name(n))
                if names:
                    runs.append((i, names))
            if runs:
                labelled.append((cls, runs))
        if len(labelled) >= 2:
            runs_out = [(i, label, names) for label, (_, runs) in enumerate(labelled) for i, names in runs]
            return runs_out, [cls for cls, _ in labelled]
    found = sorted(
        (os.path.join(f.path, n), i, n)
        for i, f in enumerate(folders)
        if not f.hidden
        for n in f.files
        if _is_image_name(n)
    )
    unlabeled: list[_Run] = []
    for _, i, n in found:
        if unlabeled and unlabeled[-1][0] == i:
            unlabeled[-1][2].append(n)
        else:
            unlabeled.append((i, -1, [n]))
    return unlabeled, []


def _samples(paths: Sequence[str], runs: Sequence[_Run]) -> list[tuple[str, int]]:
    samples: list[tuple[str, int]] = []
    for i, label, names in runs:
        prefix = os.path.join(paths[i], "")  # prefix + name == os.path.join(paths[i], name)
        samples += [(prefix + name, label) for name in names]
    return samples


def _cache_file(list_cache: str, real: str) -> str:
    digest = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    hint = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(real))[:40]  # for people looking
    return os.path.join(list_cache, f"{hint}-{digest}.json" if hint else f"{digest}.json")


def _read_cache(file: str, directory: str, real: str) -> tuple[list[tuple[str, int]], list[str]] | None:
    """The cached listing of ``directory`` when ``file`` holds one that is still right, else None."""
    try:
        with open(file, encoding="ascii") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.info("ignoring the unreadable file list %s (%s): listing again", file, err)
        return None
    try:
        if (data["format"], data["directory"], data["extensions"]) != (
            _LIST_FORMAT,
            real,
            list(IMAGE_EXTENSIONS),
        ):
            log.debug("file list %s is for another directory, format or extension list", file)
            return None
        paths = []
        # One stat per folder: a folder's mtime moves when an entry in it is added, removed or
        # renamed, and a new sub-folder moves its parent's.
        for rel, mtime_ns in data["folders"]:
            path = os.path.join(directory, rel) if rel else directory
            if os.stat(path).st_mtime_ns != mtime_ns:
                log.debug("file list %s is out of date: %s changed", file, path)
                return None
            paths.append(path)
        classes, runs = data["classes"], data["runs"]
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)) or not all(
            0 <= i < len(paths) and isinstance(label, int) and -1 <= label < len(classes)
            for i, label, _ in runs
        ):
            raise ValueError("bad folder index, class or label")
        return _samples(paths, runs), classes
    except OSError as err:  # a recorded folder is gone
        log.debug("file list %s is out of date: %s", file, err)
        return None
    except (KeyError, TypeError, ValueError, IndexError) as err:
        log.info("ignoring the corrupt file list %s (%r): listing again", file, err)
        return None


def _write_cache(file: str, data: dict) -> bool:
    """Write ``data`` to ``file`` atomically (a unique temporary file beside it, then os.replace:
    readers and concurrent writers on a shared file system see a whole file, the old or a new one)."""
    folder = os.path.dirname(file)
    tmp = f"{file}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.makedirs(folder, exist_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="ascii") as f:
            json.dump(data, f, separators=(",", ":"))  # ASCII: odd (surrogate-escaped) names survive
        os.replace(tmp, file)
        return True
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if folder not in _UNWRITABLE_CACHES:
            _UNWRITABLE_CACHES.add(folder)
            log.warning("cannot write the file list cache in %s (%s): going on without it", folder, err)
        return False


def imagefolder_listing(
    directory: str | os.PathLike, list_cache: str | os.PathLike | None = None
) -> tuple[list[tuple[str, int]], list[str]]:
    """The images of an image folder and its classes: ``(samples, classes)``, samples
    ``(path, label)`` (label -1 and no classes when unlabeled; the rules are :func:`_runs`').

    With ``list_cache`` (a folder), the list is kept there in one file per directory (named by a
    hash of its real path) together with the mtime of every folder walked, and read back instead
    of walking the tree as long as none of those mtimes has changed. A missing, stale or corrupt
    file means listing again (and rewriting it); an unwritable cache folder means going on without.
    """
    directory = os.fspath(directory)
    file = real = None
    if list_cache is not None:
        real = os.path.realpath(directory)
        file = _cache_file(os.path.expanduser(os.fspath(list_cache)), real)
        cached = _read_cache(file, directory, real)
        if cached is not None:
            log.info("file list of %s from cache (%d images)", directory, len(cached[0]))
            return cached
    start, started_ns = time.perf_counter(), time.time_ns()
    folders, loose, complete = _walk(directory)
    runs, classes = _runs(folders, loose)
    samples = _samples([f.path for f in folders], runs)
    if file is None:
        where = "no list cache"
    elif not complete:
        where = "not cached: a folder could not be read"
    elif any(f.mtime_ns >= started_ns - _RACY_NS for f in folders):
        where = f"not cached: folders changed less than {_RACY_NS / 1e9:g} s ago"
    else:
        data = {
            "format": _LIST_FORMAT,
            "directory": real,
            "extensions": list(IMAGE_EXTENSIONS),
            "folders": [[f.rel, f.mtime_ns] for f in folders],
            "classes": classes,
            "runs": runs,
        }
        where = f"cached in {file}" if _write_cache(file, data) else "not cached"
    log.info(
        "listed %d images in %d folders in %.2f s (%s)",
        len(samples),
        len(folders),
        time.perf_counter() - start,
        where,
    )
    return samples, classes


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


def build_imagefolder(
    split: str,
    root: str | None,
    transform: Callable | None,
    in_chans: int,
    on_bad_image: str = "skip",
    bad_image_log: str | os.PathLike | None = None,
    decode_on: str = "workers",
    list_cache: str | os.PathLike | None = None,
) -> ImageFolderDataset:
    if root is None:
        raise ValueError("dataset imagefolder needs data.root: the folder that holds the images")
    directory = _imagefolder_split_dir(os.fspath(root), split)

    samples, classes = imagefolder_listing(directory, list_cache)
    if not samples:
        raise ValueError(
            f"no images found under {directory!r} (data.root={root!r}); looked recursively for files with "
            f"extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
    dataset = ImageFolderDataset(
        samples, classes, directory, transform, in_chans, on_bad_image, bad_image_log, decode_on
    )
    dataset.probe("image files found", "Check data.root.")
    return dataset
