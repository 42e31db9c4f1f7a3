"""Encoded images (files, dataset columns, stream records): decoded in the run's mode, one by one
in the DataLoader workers or a batch at a time on the training device, unreadable ones skipped
and logged.

Every format that stores encoded images (``imagefolder``, ``hf``, ``litdata``) reads them through
:class:`EncodedImages`, so a bad file is handled the same way whatever holds it.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from msn.data.transforms import INTERPOLATIONS, image_mode

__all__ = [
    "DECODE_ON",
    "ON_BAD_IMAGE",
    "BadImageError",
    "BadImageLog",
    "EncodedImage",
    "EncodedImages",
    "bad_image_summary",
    "decode_batch",
    "load_image",
    "read_bad_image_log",
    "to_mode",
]

log = logging.getLogger(__name__)

# What a dataset does with an image that cannot be decoded (data.on_bad_image).
ON_BAD_IMAGE: tuple[str, ...] = ("skip", "raise")
# Where encoded images are decoded (data.decode_on): per image in the DataLoader workers (PIL), or
# per batch on the training device (torchvision's decode_jpeg; nvJPEG on CUDA).
DECODE_ON: tuple[str, ...] = ("workers", "device")
# Unreadable images in a row after which a skipping dataset gives up: the data itself is broken.
MAX_CONSECUTIVE_BAD = 100
# Images decoded when a dataset is built, so that data without a single readable image fails
# before training starts (spread over the dataset).
PROBE_SAMPLES = 16
# Per process, how many unreadable images are warned about one by one (all go to the log file).
_MAX_BAD_IMAGE_WARNINGS = 20
_JPEG_MAGIC = b"\xff\xd8\xff"


class BadImageError(ValueError):
    """An image cannot be decoded (truncated, corrupt, empty, not an image)."""


class EncodedImage(bytes):
    """The encoded bytes of one image and the ``name`` it is reported by (a path, a row).

    A ``bytes`` subclass, so that the DataLoader collates a batch of them into a plain list and
    Lightning leaves them on the host, where ``decode_jpeg`` wants its input."""

    name: str

    def __new__(cls, data: bytes, name: str) -> EncodedImage:
        self = super().__new__(cls, data)
        self.name = name
        return self

    def __reduce__(self) -> tuple[Any, ...]:  # worker processes send them through pickle
        return EncodedImage, (bytes(self), self.name)


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


def load_image(source: str | os.PathLike | bytes, mode: str, name: str | None = None) -> Image.Image:
    """Decode a file (a path) or encoded bytes completely and convert the image to ``mode``.

    Raises:
        BadImageError: it cannot be decoded; the message names it (``name``, else the path) and
            the reason.
    """
    encoded = isinstance(source, bytes)
    name = name or (getattr(source, "name", None) if encoded else os.fspath(source)) or "<bytes>"
    try:
        if (len(source) if encoded else os.path.getsize(source)) == 0:
            raise BadImageError(f"{name}: empty file (0 bytes)")
        with Image.open(io.BytesIO(source) if encoded else source) as img:
            # Decode now: truncated or corrupt pixel data fails here, not later inside a transform.
            img.load()
            return to_mode(img, mode)
    except BadImageError:
        raise
    except Exception as err:  # any decoder failure means this one image is unusable
        raise BadImageError(f"{name}: {type(err).__name__}: {err}") from err


def read_bad_image_log(path: str | os.PathLike) -> dict[str, str]:
    """``{image: reason}`` from a bad-image log (tab-separated lines; duplicates from several
    worker processes or epochs collapse to one entry). A missing log means no bad image."""
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
    """One line on the unreadable images a run skipped (None when it skipped none)."""
    if path is None:
        return None
    bad = read_bad_image_log(path)
    if not bad:
        return None
    return f"skipped {len(bad)} unreadable image file(s) (list: {path})"


class BadImageLog:
    """Where a process reports the images it skips: a warning for the first few, and one
    ``name<TAB>reason`` line each in ``path`` (shared by the workers and the training process)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.count = 0

    def record(self, name: str, reason: str) -> None:
        # Workers of an earlier epoch (or another worker) may have listed it: once per run.
        if self.path is not None and name in read_bad_image_log(self.path):
            return
        self.count += 1
        if self.count <= _MAX_BAD_IMAGE_WARNINGS:
            log.warning("skipping unreadable image %s", reason)
            if self.count == _MAX_BAD_IMAGE_WARNINGS:
                where = f"only listed in {self.path}" if self.path else "not warned about"
                log.warning("further unreadable images are %s", where)
        if self.path is not None:
            # One write per line in append mode: lines from several processes do not mix.
            reason = reason.removeprefix(f"{name}: ").replace("\n", " ").replace("\t", " ")
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"{name}\t{reason}\n")


def raise_bad(err: BadImageError) -> None:
    raise BadImageError(
        f"unreadable image {err} (data.on_bad_image=raise; data.on_bad_image=skip skips such files)"
    ) from err


class EncodedImages:
    """What a dataset of encoded images does with sample ``index``: decode it and apply the
    transform (``decode_on="workers"``), or only read its bytes (``"device"``: an
    :class:`EncodedImage` that :func:`decode_batch` decodes with the rest of the batch).

    An image that cannot be decoded stops the run with :class:`BadImageError`
    (``on_bad_image="raise"``) or is skipped (``"skip"``): the next readable one takes its place,
    so batches keep their size, and it is listed in ``bad_image_log``. With ``decode_on="device"``
    only empty records are found here; the others are found by :func:`decode_batch`.

    A subclass calls :meth:`_init_encoded` and implements ``__len__`` and :meth:`_read`.
    """

    # Not ``transform``: LitData's StreamingDataset applies an attribute of that name to its records.
    image_transform: Callable | None
    _mode: str

    def _init_encoded(
        self,
        transform: Callable | None,
        in_chans: int,
        on_bad_image: str,
        bad_image_log: str | os.PathLike | None,
        decode_on: str,
    ) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {list(ON_BAD_IMAGE)}, got {on_bad_image!r}")
        if decode_on not in DECODE_ON:
            raise ValueError(f"decode_on must be one of {list(DECODE_ON)}, got {decode_on!r}")
        self.image_transform = transform
        self.in_chans = in_chans
        self.on_bad_image = on_bad_image
        self.bad_image_log = None if bad_image_log is None else os.fspath(bad_image_log)
        self.decode_on = decode_on
        self._mode = image_mode(in_chans)
        self._log = BadImageLog(self.bad_image_log)
        # Indices found unreadable by this process: not read again.
        self._bad: set[int] = set()

    def _read(self, index: Any) -> tuple[str | bytes, int, str]:
        """``(path or encoded bytes, label, name)`` of sample ``index`` (an int, or the subclass's
        own index type for the first attempt)."""
        raise NotImplementedError

    def probe(self, what: str, hint: str) -> None:
        """Fail now when none of up to :data:`PROBE_SAMPLES` samples spread over the dataset
        decodes: a few bad images are skipped during training, but data where not one of them
        decodes (a wrong folder or column, all files broken) must not start a run.

        Raises:
            BadImageError: naming ``what`` was searched, a few reasons, and ``hint``.
        """
        n = len(self)
        picks = sorted({int(i) for i in np.linspace(0, n - 1, min(n, PROBE_SAMPLES))})
        errors = []
        for i in picks:
            source, _, name = self._read(i)
            try:
                load_image(source, self._mode, name)
                return
            except BadImageError as err:
                errors.append(str(err))
        checked = "all" if len(picks) == n else f"{len(picks)} (spread over them)"
        raise BadImageError(
            f"no readable image among the {n} {what}: {checked} checked, none decodes "
            f"(e.g. {'; '.join(errors[:3])}). {hint}"
        )

    def _encoded(self, index: int, key: Any = None) -> tuple[Any, int]:
        """Sample ``index`` (read as ``key`` when given, e.g. LitData's chunk index); an unreadable
        one is replaced by the next readable sample."""
        n = len(self)
        for offset in range(MAX_CONSECUTIVE_BAD):
            i = (index + offset) % n
            if i in self._bad:
                continue
            source, label, name = self._read(key if offset == 0 and key is not None else i)
            try:
                if self.decode_on == "device":
                    data = source if isinstance(source, bytes) else _read_file(source)
                    if not data:
                        raise BadImageError(f"{name}: empty file (0 bytes)")
                    return EncodedImage(data, name), label
                img = load_image(source, self._mode, name)
            except BadImageError as err:
                if self.on_bad_image == "raise":
                    raise_bad(err)
                self._bad.add(i)
                self._log.record(name, str(err))
                continue
            return (img if self.image_transform is None else self.image_transform(img)), label
        raise BadImageError(
            f"{MAX_CONSECUTIVE_BAD} images in a row from {self._read(index)[2]!r} on cannot be read "
            f"(see {self.bad_image_log or 'the warnings above'}); is the data damaged?"
        )


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise BadImageError(f"{path}: {type(err).__name__}: {err}") from err


def _square(image: Tensor, size: int | None, interpolation: str) -> Tensor:
    """Short side resized to ``size`` and a centred square cut, as the workers' load transform
    does (``None``: as stored)."""
    if size is None:
        return image
    image = TF.resize(image, [size], interpolation=INTERPOLATIONS[interpolation], antialias=True)
    return TF.center_crop(image, [size, size])


def _decode_on_host(data: EncodedImage, mode: str) -> Tensor:
    img = load_image(data, mode)
    return (
        torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
        .reshape(img.height, img.width, -1)
        .permute(2, 0, 1)
    )


def decode_batch(
    images: Sequence[EncodedImage],
    in_chans: int,
    size: int | None,
    device: torch.device | str,
    interpolation: str = "bilinear",
    on_bad_image: str = "skip",
    bad_image_log: BadImageLog | None = None,
) -> Tensor:
    """A batch of encoded images as one uint8 tensor ``(B, in_chans, size, size)`` on ``device``.

    JPEGs are decoded together by ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on CUDA);
    other formats, and JPEGs it cannot decode, are decoded on the host by PIL. An image neither
    decodes is skipped (another image of the batch takes its place, so the batch keeps its size)
    or raises, per ``on_bad_image``. Each image is then resized (short side to ``size``) and cut
    to a centred square; ``size=None`` needs all images of one size.
    """
    mode = image_mode(in_chans)
    read_mode = ImageReadMode.RGB if in_chans == 3 else ImageReadMode.GRAY
    device = torch.device(device)
    out: list[Tensor | None] = [None] * len(images)
    jpegs = [i for i, data in enumerate(images) if data[:3] == _JPEG_MAGIC]
    if jpegs:
        frames = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpegs]
        try:
            decoded = decode_jpeg(frames, mode=read_mode, device=device)
        except RuntimeError:  # one bad frame fails the whole call: decode one by one to find it
            decoded = []
            for frame in frames:
                try:
                    decoded.append(decode_jpeg(frame, mode=read_mode, device=device))
                except RuntimeError:
                    decoded.append(None)
        for i, image in zip(jpegs, decoded):
            out[i] = image
    for i, image in enumerate(out):
        if image is not None:
            continue
        try:
            out[i] = _decode_on_host(images[i], mode).to(device)
        except BadImageError as err:
            if on_bad_image == "raise":
                raise_bad(err)
            if bad_image_log is not None:
                bad_image_log.record(images[i].name, str(err))
    good = [i for i, image in enumerate(out) if image is not None]
    if not good:
        raise BadImageError(f"none of the {len(images)} images of a batch decodes (e.g. {images[0].name})")
    squares = {i: _square(out[i], size, interpolation) for i in good}  # type: ignore[arg-type]
    # A skipped image is replaced by the readable one before it (the first readable at the start).
    filled = [squares[max((g for g in good if g <= i), default=good[0])] for i in range(len(images))]
    shapes = {tuple(t.shape) for t in filled}
    if len(shapes) > 1:
        raise ValueError(
            f"images of different sizes in one batch {sorted(shapes)}: set data.load_size to decode "
            "them to one square size"
        )
    return torch.stack(filled)
