"""Batched (on-device) multi-view augmentation, checked against torchvision's per-image functions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from msn.data import MSNDataModule
from msn.data.batched import (
    BatchedMultiView,
    _blend,
    _gaussian_blur,
    _rotate_hue,
    crop_and_resize,
    sample_crop_boxes,
)
from msn.data.resumable import batch_seed
from tests.helpers import fit_steps, record_views, tiny_module


def test_crop_boxes_follow_torchvision_rule():
    g = torch.Generator().manual_seed(0)
    n, h, w, scale, ratio = 4000, 28, 28, (0.3, 1.0), (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(n, h, w, scale, ratio, generator=g)
    x1, y1, x2, y2 = boxes.unbind(1)
    bw, bh = x2 - x1, y2 - y1
    assert torch.equal(boxes, boxes.round())
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all()
    assert (bw >= 1).all() and (bh >= 1).all()
    # Same distribution as torchvision's sampler (its own draws, independent RNG).
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(1, h, w), scale, ratio) for _ in range(n)])
    ref_area = (ref[:, 2] * ref[:, 3]).float() / (h * w)
    area = (bw * bh) / (h * w)
    assert abs(area.mean() - ref_area.mean()) < 0.015
    assert abs((x1 + bw / 2).mean() - (ref[:, 1] + ref[:, 3] / 2).float().mean()) < 0.3


def test_crop_boxes_fallback_is_central_crop_within_ratio():
    # Scale 1 with aspect ratios (2, 3) never fits a square image: torchvision's fallback.
    boxes = sample_crop_boxes(5, 20, 20, (1.0, 1.0), (2.0, 3.0), generator=torch.Generator().manual_seed(1))
    assert torch.equal(boxes, torch.tensor([[0.0, 5.0, 20.0, 15.0]]).expand(5, 4))


def test_crop_and_resize_identity_and_upscale_match_torchvision():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 16, 16, generator=g)
    full = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).expand(3, 4)
    torch.testing.assert_close(crop_and_resize(images, full, 16), images)
    # Upscaling a crop: bilinear with half-pixel centres, as torchvision's resize (no antialias).
    # Only the outermost output pixels differ: torchvision clamps at the crop's edge, roi_align
    # reads the real neighbouring pixels of the image.
    box = torch.tensor([[2.0, 3.0, 10.0, 11.0]]).expand(3, 4)
    ref = TF.resized_crop(images, 3, 2, 8, 8, [24, 24], InterpolationMode.BILINEAR, antialias=False)
    out = crop_and_resize(images, box, 24)
    torch.testing.assert_close(out[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], atol=1e-5, rtol=0)
    # Downscaling by 2: each output pixel averages its 2x2 block (antialiased, no aliasing).
    down = crop_and_resize(images, full, 8)
    torch.testing.assert_close(down, torch.nn.functional.avg_pool2d(images, 2), atol=1e-5, rtol=0)


def test_color_ops_match_torchvision_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 9, 9, generator=g)
    f = torch.tensor([0.6, 1.0, 1.3, 1.8])
    bright = _blend(x, torch.zeros_like(x), f)
    gray_mean = TF.rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    contrast = _blend(x, gray_mean.expand_as(x), f)
    shift = torch.tensor([-0.1, 0.0, 0.05, 0.1])
    hue = _rotate_hue(x, shift)
    for i in range(4):
        torch.testing.assert_close(bright[i], TF.adjust_brightness(x[i], f[i].item()))
        torch.testing.assert_close(contrast[i], TF.adjust_contrast(x[i], f[i].item()), atol=1e-6, rtol=0)
        torch.testing.assert_close(hue[i], TF.adjust_hue(x[i], shift[i].item()), atol=1e-5, rtol=0)


def test_blur_matches_torchvision_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 12, 12, generator=g)
    sigma = torch.tensor([0.3, 1.0, 2.0])
    out = _gaussian_blur(x, 5, sigma)
    for i in range(3):
        ref = TF.gaussian_blur(x[i], [5, 5], [sigma[i].item()] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def _aug(**kw):
    base = dict(
        rand_size=16,
        focal_size=8,
        focal_views=3,
        in_chans=1,
        mean=[0.5],
        std=[0.5],
        color_jitter=0.5,
        color_jitter_p=0.8,
        blur_p=0.5,
        blur_sigma=(0.1, 2.0),
    )
    base.update(kw)
    return base


def test_batched_views_shapes_determinism_and_normalisation():
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    views = BatchedMultiView(generator=torch.Generator().manual_seed(3), **_aug())(images)
    again = BatchedMultiView(generator=torch.Generator().manual_seed(3), **_aug())(images)
    assert len(views) == 1 + 1 + 3
    assert [tuple(v.shape) for v in views] == [(6, 1, 16, 16)] * 2 + [(6, 1, 8, 8)] * 3
    for a, b in zip(views, again):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(views[0], views[1])  # the views differ
    # A plain full-image "crop" with only a certain flip: the normalised flipped image.
    plain = BatchedMultiView(
        **_aug(
            rand_size=28,
            focal_views=0,
            rand_scale=(1.0, 1.0),
            color_jitter=0.0,
            blur_p=0.0,
            hflip_p=1.0,
        )
    )
    plain_views = plain(images)
    expected = (images.float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(plain_views[0], expected.flip(-1), atol=1e-5, rtol=0)


def test_batched_rejects_wrong_channels_and_bad_arguments():
    aug = BatchedMultiView(**_aug())
    with pytest.raises(ValueError, match=r"expected a batch \(B, 1, H, W\)"):
        aug(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="hflip_p"):
        BatchedMultiView(**_aug(hflip_p=1.5))


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=pytest.mark.cuda)])
def test_datamodule_device_augmentation_trains(tmp_path, accelerator):
    dm = MSNDataModule(
        name="digits",
        in_chans=1,
        batch_size=16,
        mean=[0.5],
        std=[0.5],
        augment_on="device",
        transform=dict(rand_size=16, focal_size=8, focal_views=2, rand_scale=(0.8, 1.0), color_jitter_p=0.0),
    )
    images, labels, seeds = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (16, 1, 8, 8)  # raw digits, not views
    assert seeds.shape == (16,) and seeds.dtype == torch.int64  # the sample seeds, for the views
    with pytest.raises(ValueError, match="data.augment_on must be one of"):
        MSNDataModule(name="digits", in_chans=1, augment_on="gpu")
    with pytest.raises(ValueError, match="needs data.load_size"):
        MSNDataModule(name="imagefolder", root=str(tmp_path), augment_on="device")
    model = tiny_module(num_prototypes=8, mask_ratio=0.15, mask_seed=None)
    before = model.prototypes.detach().clone()
    seen = record_views(dm)
    fit_steps(model, dm, 2, accelerator, default_root_dir=tmp_path)
    assert model.global_step == 2
    devices = {device for batch in seen for _, device in batch}
    assert len(seen) == 2 and devices == {"cuda" if accelerator == "gpu" else "cpu"}  # the training device
    assert not torch.equal(before, model.prototypes.detach())


def _device_views(rank: int, world_size: int, global_seed: int) -> list[torch.Tensor]:
    """The views of the first training batch of ``rank``, made by on_after_batch_transfer."""
    dm = MSNDataModule(
        name="digits",
        in_chans=1,
        batch_size=8,
        augment_on="device",
        transform=dict(rand_size=16, focal_size=8, focal_views=1),
    )
    dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank, training=True)
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(global_seed)  # every rank of a real run is seeded alike; must not matter
    views, labels = dm.on_after_batch_transfer(batch, 0)
    assert torch.equal(labels, batch[1])
    return views


def test_device_views_come_from_the_sample_seeds_not_the_global_state():
    first = _device_views(rank=0, world_size=2, global_seed=0)
    again = _device_views(rank=0, world_size=2, global_seed=123)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # what a resume needs
    other_rank = _device_views(rank=1, world_size=2, global_seed=0)
    # Other images and, with the same global seed, other crops: no view equals rank 0's.
    assert not any(torch.equal(a, b) for a, b in zip(first, other_rank, strict=True))


def test_batch_seed_depends_on_every_sample_seed():
    seeds = torch.tensor([3, 5, 7])
    assert batch_seed(seeds) == batch_seed(seeds.clone())
    assert batch_seed(seeds) != batch_seed(torch.tensor([3, 5, 8]))
    assert batch_seed(seeds) != batch_seed(torch.tensor([5, 3, 7]))


@pytest.mark.cuda
def test_cuda_batched_ops_match_the_cpu():
    """The batched view ops give on a GPU what they give on the CPU for the same random draws
    (the draws themselves differ between devices: each has its own generator)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 28, 28, generator=g)
    boxes = sample_crop_boxes(6, 28, 28, (0.3, 1.0), generator=g)
    factor, shift = torch.rand(6, generator=g) + 0.5, torch.rand(6, generator=g) - 0.5
    sigma = torch.rand(6, generator=g) * 1.9 + 0.1
    cpu = [
        crop_and_resize(x, boxes, 16),
        _blend(x, x.flip(-1), factor),
        _rotate_hue(x, shift),
        _gaussian_blur(x, 9, sigma),
    ]
    xc = x.cuda()
    gpu = [
        crop_and_resize(xc, boxes.cuda(), 16),
        _blend(xc, xc.flip(-1), factor.cuda()),
        _rotate_hue(xc, shift.cuda()),
        _gaussian_blur(xc, 9, sigma.cuda()),
    ]
    for name, a, b in zip(("crop_and_resize", "blend", "rotate_hue", "gaussian_blur"), cpu, gpu):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, atol=1e-5, rtol=0, msg=name)
    # The whole augmentation on a GPU: its own generator, reproducible, normalised like the CPU's.
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8, device="cuda")
    aug = BatchedMultiView(**_aug()).cuda()
    views = aug(images, torch.Generator(device="cuda").manual_seed(3))
    again = aug(images, torch.Generator(device="cuda").manual_seed(3))
    assert [v.device.type for v in views] == ["cuda"] * 5
    assert all(torch.equal(a, b) for a, b in zip(views, again))
