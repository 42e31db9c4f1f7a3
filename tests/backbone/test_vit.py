import pytest
import torch
import torch.nn.functional as F

from msn import backbone
from msn.backbone import VIT_SIZES, build_vit, embed_tokens, encode, extract, forward_tokens
from msn.head import ProjectionHead, init_prototypes
from msn.masking import num_kept


def _vit(**kw):
    torch.manual_seed(0)
    kw.setdefault("arch", "vit_nano")
    kw.setdefault("patch_size", 4)
    kw.setdefault("img_size", 16)
    kw.setdefault("in_chans", 1)
    return build_vit(**kw).eval()


@pytest.mark.parametrize("arch", ["vit_nano", "vit_micro", "vit_tiny", "vit_small"])
def test_registry_sizes(arch):
    vit = build_vit(arch, patch_size=16, img_size=32)
    size = VIT_SIZES[arch]
    assert vit.embed_dim == size.embed_dim and len(vit.blocks) == size.depth
    assert vit.blocks[0].attn.num_heads == size.num_heads
    assert vit.blocks[0].attn.qkv.bias is not None  # qkv bias
    assert vit.norm.eps == pytest.approx(1e-6)


def test_registry_has_paper_sizes():
    assert {"vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge"} <= set(VIT_SIZES)
    assert (VIT_SIZES["vit_base"].embed_dim, VIT_SIZES["vit_large"].depth) == (768, 24)


def test_unknown_arch_and_patch():
    with pytest.raises(ValueError, match="vit_gigantic.*allowed"):
        build_vit("vit_gigantic")
    with pytest.raises(ValueError, match="patch_size"):
        build_vit("vit_nano", patch_size=5)
    with pytest.raises(ValueError, match="smaller than one patch"):
        build_vit("vit_nano", patch_size=16, img_size=8)


def test_official_init():
    vit = build_vit("vit_small", patch_size=16, img_size=224)
    assert 0.01 < vit.cls_token.std().item() < 0.03  # trunc_normal(0.02), not timm's 1e-6
    assert 0.01 < vit.pos_embed.std().item() < 0.03
    assert torch.all(vit.blocks[0].attn.qkv.bias == 0)
    # Patch convolution: kaiming_normal (fan_in = 3 * 16 * 16, relu gain), bias 0.
    conv = vit.patch_embed.proj
    assert conv.weight.std().item() == pytest.approx((2 / (3 * 16 * 16)) ** 0.5, rel=0.02)
    assert torch.all(conv.bias == 0)
    head = ProjectionHead(384, 2048, 256)
    assert [n for n, _ in head.named_children()] == ["fc1", "bn1", "gelu1", "fc2", "bn2", "gelu2", "fc3"]
    assert 0.015 < head.fc1.weight.std().item() < 0.025
    protos = init_prototypes(1024, 256)
    assert protos.abs().max() <= 1 / 16 and protos.abs().max() > 0.05


@pytest.mark.parametrize("channels", [1, 3])
def test_any_image_size_and_channels(channels):
    vit = _vit(in_chans=channels, img_size=32)
    for size in (32, 16, 8, 12):
        cls_pre, cls = encode(vit, torch.randn(2, channels, size, size))
        assert cls_pre.shape == cls.shape == (2, vit.embed_dim)


def test_unmasked_encode_matches_timm_forward_at_native_size():
    vit = _vit()
    x = torch.randn(3, 1, 16, 16)
    _, cls = encode(vit, x)
    torch.testing.assert_close(cls, vit.forward_features(x)[:, 0])


def test_pos_embed_resampled_bicubic_for_focal_crops():
    vit = _vit()
    table = backbone.pos_embed_for(vit, 2, 2)
    assert table.shape == (1, 5, vit.embed_dim)
    torch.testing.assert_close(table[:, 0], vit.pos_embed[:, 0])  # class position untouched
    grid = vit.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False)
    torch.testing.assert_close(table[:, 1:], ref.flatten(2).transpose(1, 2))


def test_pos_embed_resampled_in_the_tables_precision():
    vit = _vit().double()
    grid = vit.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    table = backbone.pos_embed_for(vit, 2, 2)
    assert table.dtype == torch.float64
    torch.testing.assert_close(table[:, 1:], ref, rtol=1e-15, atol=1e-15)  # no float32 round trip


def test_non_multiple_size_trims_like_the_convolution():
    vit = _vit(patch_size=7, img_size=28)
    x = torch.randn(2, 1, 26, 26)  # 3x3 patches, 5 pixels ignored by the stride-7 conv
    tokens = embed_tokens(vit, x)
    assert tokens.shape[1] == 1 + 9
    conv = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[:, 1:] - backbone.pos_embed_for(vit, 3, 3)[:, 1:], conv)
    with pytest.raises(ValueError, match="smaller than one patch"):
        embed_tokens(vit, torch.randn(1, 1, 6, 6))


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_masked_encode_equals_running_blocks_on_kept_tokens(mode):
    vit = _vit()
    x = torch.randn(4, 1, 16, 16)
    g = torch.Generator().manual_seed(3)
    cls_pre, _ = encode(vit, x, mask_ratio=0.5, mask_mode=mode, generator=g)
    # brute force: same random draw, keep tokens by hand, run the blocks per image
    from msn.masking import sample_keep_indices

    idx = sample_keep_indices(4, 16, num_kept(16, 0.5), mode, generator=torch.Generator().manual_seed(3))
    tokens = embed_tokens(vit, x)
    for i in range(4):
        rows = (idx if idx.dim() == 1 else idx[i]).tolist()
        kept = torch.cat([tokens[i : i + 1, :1], tokens[i : i + 1, [1 + j for j in rows]]], dim=1)
        assert kept.shape[1] == 1 + 8
        torch.testing.assert_close(cls_pre[i], forward_tokens(vit, kept)[0, 0], rtol=1e-5, atol=1e-5)


def test_masking_changes_output_and_zero_ratio_does_not():
    vit = _vit()
    x = torch.randn(2, 1, 16, 16)
    a, _ = encode(vit, x)
    torch.testing.assert_close(a, encode(vit, x, mask_ratio=0.0)[0])
    assert not torch.allclose(a, encode(vit, x, mask_ratio=0.5)[0])


def test_extract_feature_kinds():
    vit = _vit()
    x = torch.randn(2, 1, 16, 16)
    cls_pre, cls = encode(vit, x)
    torch.testing.assert_close(extract(vit, x, "cls_prenorm"), cls_pre)
    torch.testing.assert_close(extract(vit, x, "cls"), cls)
    assert extract(vit, x, "avgpool").shape == (2, vit.embed_dim)
    with pytest.raises(ValueError, match="cls_prenorm"):
        extract(vit, x, "last7")


def test_extract_last4_matches_timm_intermediate_layers():
    # Independent computation: timm's own intermediate-layer API on the same (un-resampled) grid.
    vit = _vit()
    x = torch.randn(3, 1, 16, 16)
    outs = vit.get_intermediate_layers(x, n=4, return_prefix_tokens=True, norm=True)
    expected = torch.cat([prefix[:, 0] for _, prefix in outs], dim=1)
    got = extract(vit, x, "last4")
    assert got.shape == (3, 4 * vit.embed_dim)
    torch.testing.assert_close(got, expected)
    # The last of the four is the usual normalised class token.
    torch.testing.assert_close(got[:, -vit.embed_dim :], extract(vit, x, "cls"))
