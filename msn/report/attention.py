"""Where the class token looks: the last block's class-token attention over the patch grid, and
its figure (``attention.png``: per head and averaged, over the evaluation views, with the patches
an anchor view would keep under the run's mask ratio marked).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from msn.backbone import embed_tokens
from msn.masking import keep_indices, num_kept
from msn.report.figure import pyplot, save


@torch.no_grad()
def cls_attention(vit: VisionTransformer, images: Tensor) -> Tensor:
    """Attention weights (B, heads, N) of the class token to the N patch tokens in the last block.

    The full softmax row also gives the class token a weight on itself, so a row sums to 1 minus
    that weight. Computed from the block's own q/k (q-/k-norm included), as timm's attention does
    before the values are mixed; the encoder runs unmasked, as for evaluation.
    """
    x = vit.norm_pre(embed_tokens(vit, images))
    for block in vit.blocks[:-1]:
        x = block(x)
    last = vit.blocks[-1]
    attn = last.attn
    b, t, _ = x.shape
    qkv = attn.qkv(last.norm1(x)).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, heads, 1, 1+N)
    return logits.softmax(dim=-1)[:, :, 0, 1:]


def anchor_keep_mask(
    rows: int, cols: int, mask_ratio: float, mode: str, images: int, seed: int
) -> np.ndarray:
    """(images, rows, cols) booleans: the patches one anchor view of each image keeps at
    ``mask_ratio`` (``mode`` shared: the same patches for all, as in the official run), drawn from
    a private generator seeded by ``seed``."""
    n = rows * cols
    keep = np.ones((images, n), dtype=bool)
    if mask_ratio > 0:
        generator = torch.Generator().manual_seed(seed)
        idx = keep_indices(mode, n, num_kept(n, mask_ratio), batch_size=images, generator=generator)
        keep[:] = False
        rows_idx = np.arange(images)[:, None]
        keep[rows_idx, idx.expand(images, -1).numpy() if idx.ndim == 1 else idx.numpy()] = True
    return keep.reshape(images, rows, cols)


def _display(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """An evaluation view (C, H, W), normalised, as an (H, W) or (H, W, 3) array in [0, 1]."""
    c = image.shape[0]
    x = image.float() * torch.tensor(std[:c]).view(-1, 1, 1) + torch.tensor(mean[:c]).view(-1, 1, 1)
    x = x.clamp(0, 1).numpy()
    return x[0] if c == 1 else np.moveaxis(x[:3], 0, -1)


def plot_attention(
    images: Tensor,
    attention: Tensor,
    grid: tuple[int, int],
    keep: np.ndarray,
    path: Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    mask_ratio: float,
    title: str,
) -> Path:
    """``attention.png``: one row per image (the view with the patches an anchor view drops
    tinted blue, the mean over heads, then every head), all maps on one colour scale.

    Args:
        images: (B, C, H, W) evaluation views, normalised with ``mean`` / ``std``.
        attention: (B, heads, rows*cols) from :func:`cls_attention`.
        grid: (rows, cols) of the patch grid.
        keep: (B, rows, cols) from :func:`anchor_keep_mask`.
    """
    plt = pyplot()

    b, heads, _ = attention.shape
    rows, cols = grid
    maps = attention.float().reshape(b, heads, rows, cols).numpy()
    mean_maps = maps.mean(axis=1)
    vmax = float(max(maps.max(), 1e-6))
    h, w = images.shape[-2:]
    extent = (0, w, h, 0)
    ncols = 2 + heads
    fig, axes = plt.subplots(b, ncols, figsize=(1.25 * ncols + 1.2, 1.25 * b + 1.0), squeeze=False, dpi=100)
    column_titles = [f"view; blue: dropped\nat mask {mask_ratio:g}", "mean of heads"] + [
        f"head {i + 1}" for i in range(heads)
    ]
    image_kw = {"cmap": "gray", "vmin": 0, "vmax": 1, "extent": extent, "interpolation": "nearest"}
    overlay = None
    for i in range(b):
        shown = _display(images[i], mean, std)
        for j in range(ncols):
            ax = axes[i, j]
            ax.imshow(shown, **image_kw)
            if j == 0:
                # Dropped patches tinted blue: visible on dark and light backgrounds alike.
                tint = np.zeros((rows, cols, 4))
                tint[~keep[i]] = (0.1, 0.45, 1.0, 0.55)
                ax.imshow(tint, extent=extent, interpolation="nearest")
            else:
                m = mean_maps[i] if j == 1 else maps[i, j - 2]
                overlay = ax.imshow(
                    m, cmap="inferno", alpha=0.6, vmin=0, vmax=vmax, extent=extent, interpolation="nearest"
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(column_titles[j], fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.84, 0.97))
    if overlay is not None:  # room on the right for the bar and its label
        bar = fig.add_axes((0.86, 0.1, 0.025, 0.8))
        fig.colorbar(overlay, cax=bar).set_label("attention weight of the class token", fontsize=8)
    return save(fig, path, tight=False)
