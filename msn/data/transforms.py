"""Image transforms for MSN: the multi-view pre-training augmentation and the evaluation transform.

MSN compares one *target* view of an image with several *anchor* views of the same image: ``rand_views``
large crops at ``rand_size`` and ``focal_views`` small crops at ``focal_size``. Every view is produced by the
same augmentation recipe (random resized crop, flip, colour jitter, grayscale, blur), only the crop size and
the crop-area range differ.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from msn.checks import int_problems, is_int, is_number, own_arguments, raise_problems

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "GRAYSCALE_MEAN",
    "GRAYSCALE_STD",
    "INTERPOLATIONS",
    "ConvertMode",
    "MultiViewTransform",
    "PILGaussianBlur",
    "blur_kernel_size",
    "crop_pct_problems",
    "default_mean_std",
    "eval_transform",
    "image_mode",
    "int_problems",
    "is_int",
    "is_number",
    "mean_std_problems",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Neutral statistics for single-channel runs: maps [0, 1] pixels to [-1, 1].
GRAYSCALE_MEAN: tuple[float] = (0.5,)
GRAYSCALE_STD: tuple[float] = (0.5,)

_SUPPORTED_CHANS = (1, 3)


# ----------------------------------------------------------------------------------------------------
# Argument rules. Each returns the problems it finds as messages that name the argument, its value and what
# is allowed (an empty list when there is none), because these values usually come from a Hydra config and
# the user has to find the key to fix.
# ----------------------------------------------------------------------------------------------------
def _prob_problems(name: str, value: object) -> list[str]:
    if is_number(value) and 0.0 <= float(value) <= 1.0:  # type: ignore[arg-type]
        return []
    return [f"{name} must be a probability in [0, 1], got {value!r}"]


def crop_pct_problems(name: str, value: object) -> list[str]:
    if is_number(value) and 0.0 < float(value) <= 1.0:  # type: ignore[arg-type]
        return []
    return [f"{name} must be in (0, 1], got {value!r}"]


def _floats(value: object) -> tuple[float, ...] | None:
    """``value`` as floats (lists, tuples and OmegaConf's ListConfig alike), or None."""
    try:
        return tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None


def _pair(value: object) -> tuple[float, float] | None:
    vals = _floats(value)
    return (vals[0], vals[1]) if vals is not None and len(vals) == 2 else None


def _range_problems(name: str, value: object, high: float | None) -> list[str]:
    """A ``(lo, hi)`` pair with ``0 < lo <= hi`` (and ``hi <= high`` unless ``high`` is None)."""
    pair = _pair(value)
    if pair is not None and 0.0 < pair[0] <= pair[1] and (high is None or pair[1] <= high):
        return []
    interval = "(0, inf)" if high is None else f"(0, {high}]"
    return [f"{name} must be a pair (lo, hi) with lo <= hi, both in {interval}, got {value!r}"]


def default_mean_std(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation statistics used when none are configured: ImageNet for RGB, ``0.5`` for grayscale."""
    raise_problems(mean_std_problems(in_chans, None, None))
    return (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else (GRAYSCALE_MEAN, GRAYSCALE_STD)


def mean_std_problems(in_chans: object, mean: object, std: object) -> list[str]:
    """``in_chans`` is 1 or 3, ``mean`` and ``std`` are null or one number per channel (std > 0)."""
    if isinstance(in_chans, bool) or in_chans not in _SUPPORTED_CHANS:
        return [f"in_chans must be one of {_SUPPORTED_CHANS}, got {in_chans!r}"]
    problems = []
    for name, value in (("mean", mean), ("std", std)):
        if value is None:
            continue
        vals = _floats(value)
        if vals is None:
            problems.append(f"{name} must be a list of {in_chans} numbers (one per channel), got {value!r}")
        elif len(vals) != in_chans:
            problems.append(
                f"{name} must have one entry per channel (in_chans={in_chans}), "
                f"got {len(vals)} entries: {value!r}"
            )
        elif name == "std" and any(v <= 0 for v in vals):
            problems.append(f"std entries must be > 0, got {value!r}")
    return problems


def _resolve_mean_std(
    in_chans: object, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(in_chans, mean, std)`` with the defaults filled in; ValueError for what
    :func:`mean_std_problems` finds."""
    raise_problems(mean_std_problems(in_chans, mean, std))
    default_mean, default_std = default_mean_std(int(in_chans))  # type: ignore[call-overload]
    return (
        int(in_chans),  # type: ignore[call-overload]
        default_mean if mean is None else tuple(float(v) for v in mean),
        default_std if std is None else tuple(float(v) for v in std),
    )


def image_mode(in_chans: int) -> str:
    """PIL mode that images are converted to for a run with ``in_chans`` channels."""
    return "L" if in_chans == 1 else "RGB"


# Resampling of crops and of the evaluation resize; torchvision's default, bilinear, is official.
INTERPOLATIONS: dict[str, InterpolationMode] = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def _interpolation_problems(value: object) -> list[str]:
    if isinstance(value, str) and value in INTERPOLATIONS:
        return []
    return [f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {value!r}"]


def blur_kernel_size(sigma: float, size: int) -> int:
    """Odd kernel size of a Gaussian of std ``sigma`` cut at 3 sigma, at most the view ``size``.

    For the device-made views, which blur with a true (separable) Gaussian kernel; 3 sigma holds
    99.7 % of its mass. PIL's blur (the worker path) has no fixed size at all.
    """
    half = max(1, math.ceil(3.0 * sigma))
    half = min(half, max(1, (size - 1) // 2))  # reflect padding needs pad < size
    return 2 * half + 1


class PILGaussianBlur:
    """PIL's ``ImageFilter.GaussianBlur(radius)`` with ``radius`` (the std, in pixels) drawn from
    U(``sigma``) by torch's random state, as the official pipeline blurs. Picklable for workers.

    PIL approximates the Gaussian by repeated box blurs over the whole image, so no kernel size
    bounds the blur (torchvision's ``GaussianBlur`` truncates it at a given size).
    """

    def __init__(self, sigma: Sequence[float]) -> None:
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, img: Image.Image) -> Image.Image:
        lo, hi = self.sigma
        radius = lo + float(torch.rand(1)) * (hi - lo)
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


class ConvertMode:
    """Convert a PIL image to a fixed mode ("RGB" or "L").

    A class rather than a lambda so transforms stay picklable for DataLoader workers started with ``spawn``.
    Converting explicitly also makes palette, CMYK, RGBA and grayscale files behave in an RGB run.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        # Pillow copies the image even when the mode already matches; skip that work.
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


class MultiViewTransform:
    """The MSN views of one image: ``1`` target view, ``rand_views`` anchors, ``focal_views`` focal crops.

    The target view and the ``rand_views`` anchor views are random resized crops at ``rand_size`` with area
    fraction in ``rand_scale``; the focal views are crops at ``focal_size`` with area fraction in
    ``focal_scale``. Each view then goes through horizontal flip, colour jitter, grayscale and Gaussian blur
    with independent randomness, so all views differ. Setting a probability (or ``color_jitter``) to 0
    removes that augmentation.

    Args:
        rand_size: Side of the target and anchor views, in pixels.
        focal_size: Side of the focal views, in pixels.
        rand_views: Number of anchor views at ``rand_size`` (besides the target view), >= 1.
        focal_views: Number of focal views, >= 0.
        rand_scale: ``(lo, hi)`` crop-area fraction for target and anchor views, within (0, 1].
        focal_scale: ``(lo, hi)`` crop-area fraction for focal views, within (0, 1].
        color_jitter: Colour-jitter strength ``s``: brightness/contrast/saturation ``0.8 s``, hue ``0.2 s``.
        color_jitter_p: Probability of applying colour jitter.
        grayscale_p: Probability of converting a view to grayscale (ignored when ``in_chans == 1``).
        blur_p: Probability of applying Gaussian blur.
        blur_sigma: ``(lo, hi)`` range of the blur standard deviation.
        hflip_p: Probability of a horizontal flip.
        interpolation: Resampling of the crops, ``bilinear`` (torchvision's default, official) or
            ``bicubic``.
        in_chans: 1 (images converted to "L") or 3 (images converted to "RGB").
        mean: Per-channel normalisation mean; ``None`` -> ImageNet (3 channels) or ``(0.5,)`` (1 channel).
        std: Per-channel normalisation std; ``None`` -> ImageNet (3 channels) or ``(0.5,)`` (1 channel).
    """

    def __init__(
        self,
        rand_size: int = 224,
        focal_size: int = 96,
        rand_views: int = 1,
        focal_views: int = 10,
        rand_scale: Sequence[float] = (0.3, 1.0),
        focal_scale: Sequence[float] = (0.05, 0.3),
        color_jitter: float = 0.5,
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        hflip_p: float = 0.5,
        interpolation: str = "bilinear",
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        raise_problems(MultiViewTransform.problems(**own_arguments(locals())))
        self.interpolation = str(interpolation)
        self.rand_size, self.focal_size = int(rand_size), int(focal_size)
        self.rand_views, self.focal_views = int(rand_views), int(focal_views)
        self.rand_scale, self.focal_scale = _pair(rand_scale), _pair(focal_scale)
        self.color_jitter = float(color_jitter)
        self.color_jitter_p, self.grayscale_p = float(color_jitter_p), float(grayscale_p)
        self.blur_p, self.blur_sigma, self.hflip_p = float(blur_p), _pair(blur_sigma), float(hflip_p)
        self.in_chans, self.mean, self.std = _resolve_mean_std(in_chans, mean, std)

        self._convert = ConvertMode(image_mode(self.in_chans))
        self.rand_transform = self._view_transform(self.rand_size, self.rand_scale)
        self.focal_transform = self._view_transform(self.focal_size, self.focal_scale)

    @staticmethod
    def problems(**kwargs: object) -> list[str]:
        """Every problem of these constructor arguments (the missing ones take their defaults), one
        message each, named as the argument; TypeError for an argument the constructor does not take."""
        given = inspect.signature(MultiViewTransform).bind_partial(**kwargs)
        given.apply_defaults()
        a = given.arguments
        problems = _interpolation_problems(a["interpolation"])
        # MSN needs at least one anchor view to compare against the target view.
        for name, minimum in (("rand_size", 1), ("focal_size", 1), ("rand_views", 1), ("focal_views", 0)):
            problems += int_problems(name, a[name], minimum)
        problems += _range_problems("rand_scale", a["rand_scale"], 1.0)
        problems += _range_problems("focal_scale", a["focal_scale"], 1.0)
        # torchvision's ColorJitter caps hue at 0.5, i.e. strength 0.2 * s <= 0.5.
        if not (is_number(a["color_jitter"]) and 0.0 <= a["color_jitter"] <= 2.5):
            problems.append(
                f"color_jitter must be a strength in [0, 2.5] (0 disables it), got {a['color_jitter']!r}"
            )
        for name in ("color_jitter_p", "grayscale_p", "blur_p"):
            problems += _prob_problems(name, a[name])
        problems += _range_problems("blur_sigma", a["blur_sigma"], None)
        problems += _prob_problems("hflip_p", a["hflip_p"])
        return problems + mean_std_problems(a["in_chans"], a["mean"], a["std"])

    def _view_transform(self, size: int, scale: tuple[float, float]) -> T.Compose:
        """The augmentation pipeline of one view (SimCLR/BYOL-style recipe used by MSN)."""
        steps: list[Callable] = [
            T.RandomResizedCrop(size, scale=scale, interpolation=INTERPOLATIONS[self.interpolation])
        ]
        if self.hflip_p > 0:
            steps.append(T.RandomHorizontalFlip(p=self.hflip_p))
        if self.color_jitter > 0 and self.color_jitter_p > 0:
            s = self.color_jitter
            # Saturation and hue are meaningless on single-channel images; leave them out rather than no-op.
            sat, hue = (0.8 * s, 0.2 * s) if self.in_chans == 3 else (0.0, 0.0)
            steps.append(T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, sat, hue)], p=self.color_jitter_p))
        if self.grayscale_p > 0 and self.in_chans == 3:
            steps.append(T.RandomGrayscale(p=self.grayscale_p))
        if self.blur_p > 0:
            steps.append(T.RandomApply([PILGaussianBlur(self.blur_sigma)], p=self.blur_p))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    @property
    def num_views(self) -> int:
        """Number of tensors returned per image: target + anchor + focal views."""
        return 1 + self.rand_views + self.focal_views

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        """Return ``num_views`` tensors: the target view first, then the anchors, then the focal views."""
        img = self._convert(img)
        views = [self.rand_transform(img) for _ in range(1 + self.rand_views)]
        views += [self.focal_transform(img) for _ in range(self.focal_views)]
        return views

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_views={self.num_views}, in_chans={self.in_chans},\n"
            f"  rand ({1 + self.rand_views} views incl. target): {self.rand_transform},\n"
            f"  focal ({self.focal_views} views): {self.focal_transform})"
        )


def eval_transform(
    img_size: int,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic evaluation transform: resize the short side to ``img_size / crop_pct``, centre-crop.

    ``crop_pct=0.875`` is the usual 256 -> 224 ImageNet protocol; use ``crop_pct=1.0`` for tiny images
    (digits, MNIST, CIFAR) where cropping would cut off content. ``interpolation`` as for the
    training crops (official: bilinear).
    """
    problems = _interpolation_problems(interpolation) + int_problems("img_size", img_size, 1)
    problems += crop_pct_problems("crop_pct", crop_pct) + mean_std_problems(in_chans, mean, std)
    raise_problems(problems)
    mode = INTERPOLATIONS[interpolation]
    in_chans, mean, std = _resolve_mean_std(in_chans, mean, std)
    return T.Compose(
        [
            ConvertMode(image_mode(in_chans)),
            T.Resize(round(img_size / crop_pct), interpolation=mode),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
