"""The attention maps against a brute-force computation from the block's q/k, and against the
attention matrix timm's own (non-fused) attention forms."""

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from msn.backbone import build_vit, embed_tokens
from msn.masking import num_kept
from msn.report.attention import anchor_keep_mask, cls_attention


def brute_force(vit, images: torch.Tensor) -> torch.Tensor:
    """float64, one head and one image at a time, q and k from the weights of qkv."""
    vit = vit.double()
    x = vit.norm_pre(embed_tokens(vit, images.double()))
    for block in vit.blocks[:-1]:
        x = block(x)
    last = vit.blocks[-1]
    y = last.norm1(x)
    heads, d = last.attn.num_heads, last.attn.head_dim
    dim = heads * d
    w, b = last.attn.qkv.weight, last.attn.qkv.bias
    out = torch.zeros(images.shape[0], heads, y.shape[1] - 1, dtype=torch.float64)
    for i in range(images.shape[0]):
        for h in range(heads):
            rows_q, rows_k = slice(h * d, (h + 1) * d), slice(dim + h * d, dim + (h + 1) * d)
            q = y[i] @ w[rows_q].T + (b[rows_q] if b is not None else 0)
            k = y[i] @ w[rows_k].T + (b[rows_k] if b is not None else 0)
            q, k = last.attn.q_norm(q), last.attn.k_norm(k)
            logits = torch.tensor([float(q[0] @ k[j]) / np.sqrt(d) for j in range(k.shape[0])])
            weights = torch.exp(logits - logits.max())
            out[i, h] = (weights / weights.sum())[1:]
    return out


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cls_attention_matches_brute_force(qk_norm):
    torch.manual_seed(0)
    if qk_norm:  # not an MSN encoder option, but the function must follow timm's q/k norms
        vit = VisionTransformer(
            img_size=16,
            patch_size=4,
            in_chans=1,
            embed_dim=48,
            depth=2,
            num_heads=3,
            qk_norm=True,
            num_classes=0,
        )
        vit.eval()
        vit.patch_embed.strict_img_size = False  # as build_vit: any multiple of the patch
    else:
        vit = build_vit(arch="vit_nano", patch_size=4, img_size=16, in_chans=1).eval()
    with torch.no_grad():  # away from the near-uniform start, so an error in the scale shows
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    images = torch.randn(3, 1, 16, 12)  # a non-square view: a 4 x 3 grid
    got = cls_attention(vit, images)
    assert got.shape == (3, 3, 12)
    expected = brute_force(vit, images)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    assert float(got.sum(dim=-1).max()) < 1  # the class token keeps some weight on itself


def test_cls_attention_is_the_row_timm_forms():
    torch.manual_seed(1)
    vit = build_vit(arch="vit_nano", patch_size=4, img_size=16, in_chans=1).eval()
    last = vit.blocks[-1].attn
    last.fused_attn = False  # the explicit softmax path, whose matrix goes through attn_drop
    seen = []
    last.attn_drop.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        vit.forward_features(images)
    torch.testing.assert_close(cls_attention(vit, images), seen[-1][:, :, 0, 1:])


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_anchor_keep_mask_keeps_the_run_counts(mode):
    keep = anchor_keep_mask(4, 4, 0.3, mode, images=5, seed=0)
    assert keep.shape == (5, 4, 4) and keep.dtype == bool
    assert (keep.reshape(5, -1).sum(axis=1) == num_kept(16, 0.3)).all()
    same = all((keep[i] == keep[0]).all() for i in range(5))
    assert same == (mode == "shared")
    np.testing.assert_array_equal(keep, anchor_keep_mask(4, 4, 0.3, mode, images=5, seed=0))
    assert anchor_keep_mask(2, 2, 0.0, mode, images=3, seed=0).all()
