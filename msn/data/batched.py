"""The MSN multi-view augmentation on whole batches of uint8 images, on the training device.

The PIL pipeline (:class:`msn.data.transforms.MultiViewTransform`) augments one image at a time in
the DataLoader workers. For small images (digits, Fashion-MNIST, CIFAR) that per-image work costs
as much CPU as the model step, and on a GPU the workers can starve it. :class:`BatchedMultiView`
draws every random parameter per image, as the PIL pipeline does, but applies each augmentation
to the whole batch in a handful of tensor operations:

- random resized crop: per-image boxes (torchvision's sampling rule) cut and resized by
  ``torchvision.ops.roi_align`` (bilinear, averaging several samples per output pixel when
  shrinking, so it needs no separate antialiasing);
- horizontal flip, colour jitter (brightness, contrast, saturation, hue), grayscale and Gaussian
  blur, each with its own per-image factor and probability.

Differences from the PIL pipeline, by design: crops are always resampled bilinearly (whatever
``interpolation`` says); the colour-jitter operations run in a fixed order (brightness, contrast,
saturation, hue) instead of a random permutation per image; and the blur is a true Gaussian cut
at 3 sigma of the largest sigma (:func:`~msn.data.transforms.blur_kernel_size`, at most the view
size), where PIL approximates the same Gaussian with box blurs. All randomness comes from one
``torch.Generator`` (or the global RNG) in the training process, so it is checkpointed with the
rest of the run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from msn.data.transforms import MultiViewTransform, blur_kernel_size

__all__ = ["BatchedMultiView", "crop_and_resize", "sample_crop_boxes"]


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    attempts: int = 10,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Random-resized-crop boxes for ``n`` images of ``height x width``, as pixel edges (n, 4).

    torchvision's rule, vectorised: up to ``attempts`` draws of an area fraction in ``scale`` and a
    log-uniform aspect ratio in ``ratio``; the first draw that fits is placed uniformly at random;
    an image with no fitting draw gets the largest central crop within ``ratio``.

    Returns:
        float tensor (n, 4) of ``(x1, y1, x2, y2)`` with integer values, ``0 <= x1 < x2 <= width``.
    """
    device = torch.device(device)
    area = height * width
    target = area * _uniform(n * attempts, scale[0], scale[1], generator, device).view(n, attempts)
    log_r = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = torch.exp(log_r).view(n, attempts)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1)  # index of the first fitting draw (0 when none fits)
    rows = torch.arange(n, device=device)
    w, h, any_fit = w[rows, first], h[rows, first], fits.any(dim=1)

    # Fallback of torchvision: the whole image, cut to the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(any_fit, w, torch.full_like(w, fw))
    h = torch.where(any_fit, h, torch.full_like(h, fh))
    # Uniform integer offsets in [0, size - crop]; the fallback is centred.
    u = torch.rand(2, n, generator=generator, device=device)
    y1 = torch.where(any_fit, torch.floor(u[0] * (height - h + 1)), torch.round((height - h) / 2))
    x1 = torch.where(any_fit, torch.floor(u[1] * (width - w + 1)), torch.round((width - w) / 2))
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def crop_and_resize(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Cut ``boxes`` (n, 4 pixel edges, one per image) out of ``images`` (n, C, H, W) at ``size`` px.

    Bilinear; ``roi_align`` with ``aligned=True`` treats the box as pixel edges, so the box
    ``(0, 0, W, H)`` at the image's own size returns the image unchanged.
    """
    idx = torch.arange(images.shape[0], device=images.device, dtype=boxes.dtype).unsqueeze(1)
    rois = torch.cat([idx, boxes.to(images.dtype if images.is_floating_point() else torch.float32)], dim=1)
    return roi_align(images.float(), rois.float(), output_size=(size, size), sampling_ratio=-1, aligned=True)


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """``factor * a + (1 - factor) * b`` per image, clamped to [0, 1] (torchvision's _blend)."""
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp_(0, 1)


def _gray(x: Tensor) -> Tensor:
    return TF.rgb_to_grayscale(x) if x.shape[1] == 3 else x


def _rotate_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Shift the hue of RGB images (n, 3, H, W) in [0, 1] by ``shift`` (n,) turns, through HSV."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    # HSV -> RGB
    i = torch.floor(hue * 6.0)
    f = hue * 6.0 - i
    v = maxc
    p, q, t = v * (1 - sat), v * (1 - sat * f), v * (1 - sat * (1 - f))
    i = i.long() % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, (cr, cg, cb) in enumerate(choices):
        m = (i == k).unsqueeze(1)
        out = torch.where(m, torch.stack([cr, cg, cb], dim=1), out)
    return out


def _gaussian_blur(x: Tensor, kernel_size: int, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with one sigma per image (reflect padding, as torchvision)."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (n, ks)
    k = k.repeat_interleave(c, dim=0)  # one kernel per (image, channel) group
    pad = kernel_size // 2
    y = x.reshape(1, n * c, h, w)
    y = torch.nn.functional.pad(y, (pad, pad, 0, 0), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = torch.nn.functional.pad(y, (0, 0, pad, pad), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


class BatchedMultiView(nn.Module):
    """The multi-view augmentation of :class:`MultiViewTransform`, on uint8 batches.

    Takes the same arguments (``rand_size``, ``focal_size``, ``rand_views``, ``focal_views``, the
    crop scales, ``color_jitter``/``color_jitter_p``, ``grayscale_p``, ``blur_p``/``blur_sigma``,
    ``hflip_p``, ``in_chans``, ``mean``/``std``) and validates them the same way.

    Shapes: ``forward(images, generator=None)`` with ``images`` uint8 (B, C, H, W) (or float in
    [0, 1]) returns ``1 + rand_views + focal_views`` float tensors: (B, C, rand_size, rand_size)
    for the target and anchor views, then (B, C, focal_size, focal_size) for the focal views,
    normalised. Random numbers come from ``generator`` (a per-batch one in training, see
    :func:`msn.data.resumable.batch_seed`), else the one given at construction, else the global one.
    """

    def __init__(self, generator: torch.Generator | None = None, **kwargs: object) -> None:
        super().__init__()
        # Reuse the PIL pipeline's argument checks so both backends accept exactly the same config.
        spec = MultiViewTransform(**kwargs)  # type: ignore[arg-type]
        self.spec = spec
        self.generator = generator
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    @property
    def num_views(self) -> int:
        return self.spec.num_views

    def augment(
        self, images: Tensor, size: int, scale: Sequence[float], generator: torch.Generator | None = None
    ) -> Tensor:
        """One augmented view (B, C, size, size) of float images in [0, 1], before normalisation;
        random numbers from ``generator`` (default: the one given at construction, else global)."""
        s, n, dev = self.spec, images.shape[0], images.device
        g = self.generator if generator is None else generator
        h, w = images.shape[-2:]
        boxes = sample_crop_boxes(n, h, w, scale, generator=g, device=dev)
        x = crop_and_resize(images, boxes, size).clamp_(0, 1)
        if s.hflip_p > 0:
            flip = torch.rand(n, generator=g, device=dev) < s.hflip_p
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if s.color_jitter > 0 and s.color_jitter_p > 0:
            x = self._color_jitter(x, g)
        if s.grayscale_p > 0 and s.in_chans == 3:
            gray = torch.rand(n, generator=g, device=dev) < s.grayscale_p
            x = torch.where(gray.view(-1, 1, 1, 1), TF.rgb_to_grayscale(x, num_output_channels=3), x)
        if s.blur_p > 0:
            blur = torch.rand(n, generator=g, device=dev) < s.blur_p
            sigma = _uniform(n, *s.blur_sigma, g, dev)
            blurred = _gaussian_blur(x, blur_kernel_size(s.blur_sigma[1], size), sigma)
            x = torch.where(blur.view(-1, 1, 1, 1), blurred, x)
        return x

    def _color_jitter(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        s, n, dev = self.spec, x.shape[0], x.device
        strength = s.color_jitter
        apply = (torch.rand(n, generator=g, device=dev) < s.color_jitter_p).view(-1, 1, 1, 1)
        lo, hi = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
        y = _blend(x, torch.zeros_like(x), _uniform(n, lo, hi, g, dev))  # brightness
        mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
        y = _blend(y, mean.expand_as(y), _uniform(n, lo, hi, g, dev))  # contrast
        if s.in_chans == 3:  # saturation and hue are meaningless on one channel
            gray = TF.rgb_to_grayscale(y, num_output_channels=3)
            y = _blend(y, gray, _uniform(n, lo, hi, g, dev))  # saturation
            hue = min(0.5, 0.2 * strength)
            y = _rotate_hue(y, _uniform(n, -hue, hue, g, dev))
        return torch.where(apply, y, x)

    @torch.no_grad()
    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        if images.ndim != 4 or images.shape[1] != self.spec.in_chans:
            raise ValueError(
                f"expected a batch (B, {self.spec.in_chans}, H, W), got shape {tuple(images.shape)}"
            )
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        s = self.spec
        views = [self.augment(x, s.rand_size, s.rand_scale, generator) for _ in range(1 + s.rand_views)]
        views += [self.augment(x, s.focal_size, s.focal_scale, generator) for _ in range(s.focal_views)]
        return [(v - self.mean) / self.std for v in views]
