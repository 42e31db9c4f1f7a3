"""Packed multi-crop forward: all views of an image in one encoder call equals one call per crop size."""

from __future__ import annotations

import pytest
import torch

from msn import backbone
from msn.masking import num_kept, sample_keep_indices
from tests.helpers import tiny_module

B = 3


def _vit(**kw):
    torch.manual_seed(0)
    kw = {"arch": "vit_nano", "patch_size": 4, "img_size": 16, "in_chans": 1, **kw}
    return backbone.build_vit(**kw)


def _groups(mode: str, rand_views: int = 1, focal_views: int = 2, mask_focal: bool = False):
    """(images, keep_idx) per crop size: 16 px anchors masked at 0.3, 8 px focal views."""
    g = torch.Generator().manual_seed(1)
    full = torch.randn(rand_views * B, 1, 16, 16, generator=g)
    focal = torch.randn(focal_views * B, 1, 8, 8, generator=g)
    keep_full = sample_keep_indices(full.shape[0], 16, num_kept(16, 0.3), mode, generator=g)
    keep_focal = (
        sample_keep_indices(focal.shape[0], 4, num_kept(4, 0.3), mode, generator=g) if mask_focal else None
    )
    return [(full, keep_full), (focal, keep_focal)]


def _grads(vit, out):
    """Gradients of a mean-reduced loss (the scale of a real loss) w.r.t. every encoder parameter."""
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).mean()
    return torch.autograd.grad(loss, [p for p in vit.parameters()], allow_unused=True)


@pytest.mark.parametrize("attention", ["segments", "mask"])
@pytest.mark.parametrize(
    ("mode", "rand_views", "mask_focal"),
    [("shared", 1, False), ("per_sample", 1, False), ("per_sample", 2, True), ("shared", 2, True)],
)
def test_packed_equals_separate_forwards_values_and_gradients(mode, rand_views, mask_focal, attention):
    vit = _vit()
    groups = _groups(mode, rand_views, mask_focal=mask_focal)
    separate = [backbone.encode(vit, x, keep_idx=keep) for x, keep in groups]
    pre_sep, cls_sep = (torch.cat(parts) for parts in zip(*separate))
    pre_packed, cls_packed = backbone.encode_packed(vit, groups, B, attention)
    assert cls_packed.shape == ((rand_views + 2) * B, vit.embed_dim)
    torch.testing.assert_close(pre_packed, pre_sep, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls_packed, cls_sep, rtol=1e-5, atol=1e-5)
    for name, g_packed, g_sep in zip(
        [n for n, _ in vit.named_parameters()], _grads(vit, cls_packed), _grads(vit, cls_sep)
    ):
        if g_sep is None:
            assert g_packed is None or torch.count_nonzero(g_packed) == 0, name
            continue
        torch.testing.assert_close(g_packed, g_sep, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("attention", ["segments", "mask"])
def test_packed_views_do_not_see_each_other(attention):
    """Changing one focal view leaves every other view's class token unchanged."""
    vit = _vit().eval()
    groups = _groups("shared")
    _, before = backbone.encode_packed(vit, groups, B, attention)
    focal = groups[1][0].clone()
    focal[B + 1] = torch.randn_like(focal[B + 1])  # second focal view of image 1
    _, after = backbone.encode_packed(vit, [groups[0], (focal, None)], B, attention)
    changed = (after - before).abs().amax(dim=1) > 1e-6
    expected = torch.zeros(3 * B, dtype=torch.bool)
    expected[2 * B + 1] = True  # rows: B anchors, then focal view 0 (B rows), then focal view 1
    assert torch.equal(changed, expected)


def test_block_diagonal_mask_matches_a_loop():
    lengths = [3, 1, 2]
    mask = backbone.block_diagonal_mask(lengths)
    owner = [i for i, n in enumerate(lengths) for _ in range(n)]
    expected = torch.tensor([[owner[q] == owner[k] for k in range(6)] for q in range(6)])
    assert mask.dtype == torch.bool and torch.equal(mask, expected)


def test_packed_rejects_a_group_that_is_not_whole_views():
    vit = _vit()
    with pytest.raises(ValueError, match="whole number of views"):
        backbone.encode_packed(vit, [(torch.randn(4, 1, 16, 16), None)], B)
    with pytest.raises(ValueError, match="at least one group"):
        backbone.encode_packed(vit, [], B)
    with pytest.raises(ValueError, match="attention='dense' is unknown"):
        backbone.encode_packed(vit, _groups("shared"), B, "dense")
    with pytest.raises(ValueError, match="model.packed_views"):
        tiny_module(packed_views="dense")
    with pytest.raises(ValueError, match="drop_path_rate=0"):
        backbone.encode_packed(_vit(drop_path_rate=0.1), _groups("shared"), B)


@pytest.mark.parametrize(
    ("mode", "packed_views"), [("shared", True), ("per_sample", True), ("shared", "mask")]
)
def test_module_packed_views_gives_the_same_projections_and_gradients(mode, packed_views):
    g = torch.Generator().manual_seed(2)
    views = [torch.randn(B, 1, s, s, generator=g) for s in (16, 8, 8)]
    outs = []
    for packed in (False, packed_views):
        model = tiny_module(mask_mode=mode, packed_views=packed)
        z = model.anchor_projections(views)
        grads = _grads(model.encoder, z)
        outs.append((z, grads))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for g_packed, g_sep in zip(outs[1][1], outs[0][1]):
        if g_sep is not None:
            torch.testing.assert_close(g_packed, g_sep, rtol=1e-5, atol=1e-5)
