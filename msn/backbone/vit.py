"""Vision Transformer encoders (timm) with MSN's masked forward: sizes, build, encode, features.

The encoder is a plain :class:`timm.models.vision_transformer.VisionTransformer`, so its state
dict uses timm's key names (the official MSN encoder uses the same names behind a ``module.``
prefix). What MSN adds is the forward pass: position embeddings are resampled to the crop size
(focal crops are smaller than the random crops), and after they are added a random subset of
patch tokens is dropped from the anchor view before the transformer blocks run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from msn.checks import own_arguments, raise_problems
from msn.masking import apply_keep_indices, keep_indices, num_kept


@dataclass(frozen=True)
class ViTSize:
    """Width, depth and heads of one model size (MLP ratio 4 for all)."""

    embed_dim: int
    depth: int
    num_heads: int


# The registry of model sizes. Names follow timm/DeiT; ``vit_nano`` and ``vit_micro`` are ours,
# small enough to pre-train on a CPU in minutes (the default digits / Fashion-MNIST runs).
VIT_SIZES: dict[str, ViTSize] = {
    "vit_nano": ViTSize(embed_dim=96, depth=4, num_heads=3),
    "vit_micro": ViTSize(embed_dim=128, depth=6, num_heads=4),
    "vit_tiny": ViTSize(embed_dim=192, depth=12, num_heads=3),
    "vit_small": ViTSize(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ViTSize(embed_dim=768, depth=12, num_heads=12),
    "vit_large": ViTSize(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge": ViTSize(embed_dim=1280, depth=32, num_heads=16),
}
PATCH_SIZES = (2, 4, 7, 8, 14, 16)


def build_vit(
    arch: str = "vit_small",
    patch_size: int = 16,
    img_size: int = 224,
    in_chans: int = 3,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
    grad_checkpointing: bool = False,
) -> VisionTransformer:
    """Build an MSN encoder: a timm ViT with qkv bias, LayerNorm eps 1e-6, no classifier head.

    ``embed_dim``/``depth``/``num_heads`` override the registry entry of ``arch`` (for sweeps of
    custom widths). The patch embedding accepts any image size divisible by the patch size.
    ``grad_checkpointing``: activation checkpointing of every block in training (timm's flag,
    honoured by :func:`encode` and the packed forward too): the blocks' activations are
    recomputed in the backward pass instead of stored: same gradients, one more forward of the
    anchor encoder (ViT-S/16, official views: 89 % less activation memory, +29 % step FLOPs).
    """
    raise_problems(vit_problems(**own_arguments(locals())))
    size = VIT_SIZES[arch]
    embed_dim = embed_dim or size.embed_dim
    num_heads = num_heads or size.num_heads
    vit = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=0,
        embed_dim=embed_dim,
        depth=depth or size.depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        drop_path_rate=drop_path_rate,
        # timm's default init: trunc_normal(0.02) Linear weights, zero biases, LayerNorm 1/0,
        # pos_embed trunc_normal(0.02), as the official MSN encoder.
        weight_init="",
    )
    # timm starts the class token near zero (std 1e-6) and leaves the patch convolution at
    # PyTorch's default; the official encoder uses trunc_normal(0.02) and kaiming_normal.
    nn.init.trunc_normal_(vit.cls_token, std=0.02)
    nn.init.kaiming_normal_(vit.patch_embed.proj.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(vit.patch_embed.proj.bias)
    # Focal crops are smaller than the crop the position table was built for: let the patch
    # embedding accept any multiple of the patch size; we resample the table ourselves.
    vit.patch_embed.strict_img_size = False
    vit.set_grad_checkpointing(grad_checkpointing)
    return vit


def vit_problems(**kwargs: Any) -> list[str]:
    """Every problem of these :func:`build_vit` arguments (the missing ones take their defaults),
    named as the ``model.encoder`` config keys; TypeError for an argument it does not take."""
    given = inspect.signature(build_vit).bind_partial(**kwargs)
    given.apply_defaults()
    arch, patch, img = (given.arguments[k] for k in ("arch", "patch_size", "img_size"))
    problems = []
    known = isinstance(arch, str) and arch in VIT_SIZES
    if not known:
        problems.append(f"arch={arch!r} is unknown; allowed: {', '.join(VIT_SIZES)}")
    if patch not in PATCH_SIZES:
        problems.append(f"patch_size={patch} is not supported; allowed: {PATCH_SIZES}")
    elif not (isinstance(img, int) and img >= patch):
        problems.append(f"img_size={img} is smaller than one patch (patch_size={patch})")
    if known:
        dim = given.arguments["embed_dim"] or VIT_SIZES[arch].embed_dim
        heads = given.arguments["num_heads"] or VIT_SIZES[arch].num_heads
        if not (isinstance(dim, int) and isinstance(heads, int) and heads > 0 and dim % heads == 0):
            problems.append(f"embed_dim={dim} must be divisible by num_heads={heads}")
    if not isinstance(given.arguments["grad_checkpointing"], bool):
        problems.append(f"grad_checkpointing={given.arguments['grad_checkpointing']!r} must be true or false")
    return problems


def grid_size(vit: VisionTransformer) -> tuple[int, int]:
    """Patch grid (rows, cols) that ``vit.pos_embed`` was built for."""
    return tuple(vit.patch_embed.grid_size)  # type: ignore[return-value]


def resample_pos_embed(pos_embed: Tensor, old: Sequence[int], new: Sequence[int]) -> Tensor:
    """Position table (1, 1 + rows*cols, D) of grid ``old`` resampled to grid ``new`` (rows, cols).

    Bicubic without antialiasing, the class position untouched, as the official code resamples
    for its focal crops; in the table's own precision, since timm's ``resample_abs_pos_embed``
    computes in float32 and would round a float64 table.
    """
    if tuple(old) == tuple(new):
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    dtype = torch.promote_types(grid.dtype, torch.float32)  # bicubic needs float32 at least
    grid = grid.reshape(1, *old, -1).permute(0, 3, 1, 2).to(dtype)
    grid = F.interpolate(grid, size=tuple(new), mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1).to(cls_pos.dtype)
    return torch.cat([cls_pos, grid], dim=1)


def pos_embed_for(vit: VisionTransformer, rows: int, cols: int) -> Tensor:
    """Position table (1, 1 + rows*cols, D) of ``vit`` for a patch grid, class position first."""
    return resample_pos_embed(vit.pos_embed, grid_size(vit), (rows, cols))


def embed_tokens(vit: VisionTransformer, images: Tensor) -> Tensor:
    """Patch-embed ``images`` (B, C, H, W) and add class token and position embeddings: (B, 1+N, D).

    Any size of at least one patch works; the position table is resampled to the patch grid.
    """
    p = vit.patch_embed.patch_size[0]
    h, w = images.shape[-2:]
    if h < p or w < p:
        raise ValueError(f"image size {h}x{w} is smaller than one patch ({p}x{p})")
    if h % p or w % p:
        # A stride-p convolution ignores the last h % p rows / w % p columns; trimming them first
        # gives the same tokens (the official ViT-L/7 recipe feeds 96 px focal crops this way).
        h, w = h - h % p, w - w % p
        images = images[..., :h, :w]
    x = vit.patch_embed(images)  # (B, N, D) with flatten=True
    cls = vit.cls_token.expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1) + pos_embed_for(vit, h // p, w // p)


def checkpointing(vit: VisionTransformer) -> bool:
    """Whether the blocks of ``vit`` run under activation checkpointing now: its flag is set
    (``set_grad_checkpointing``), it is in training mode and autograd records (so the no-grad
    target encoder and evaluation never pay for the recomputation)."""
    return bool(getattr(vit, "grad_checkpointing", False)) and vit.training and torch.is_grad_enabled()


def run_block(fn: Callable[..., Tensor], *args: Any, checkpoint: bool = False, **kwargs: Any) -> Tensor:
    """``fn(*args, **kwargs)``, through ``torch.utils.checkpoint`` when ``checkpoint``.

    Non-reentrant: works with inputs that need no grad, keyword arguments and torch.compile; the
    RNG state is replayed, so dropout / stochastic depth recompute the same masks.
    """
    if checkpoint:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


def forward_tokens(vit: VisionTransformer, tokens: Tensor) -> Tensor:
    """Run the transformer blocks on embedded tokens; returns the tokens BEFORE the final norm.

    timm's own checkpointing lives in ``forward_features``, which this bypasses: it is applied
    here per block instead (:func:`checkpointing`).
    """
    x = vit.norm_pre(tokens)
    if not checkpointing(vit):
        return vit.blocks(x)
    for block in vit.blocks:
        x = run_block(block, x, checkpoint=True)
    return x


def encode(
    vit: VisionTransformer,
    images: Tensor,
    mask_ratio: float = 0.0,
    mask_mode: str = "shared",
    generator: torch.Generator | None = None,
    keep_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """MSN encoder forward with optional random patch dropping.

    Args:
        vit: the encoder.
        images: (B, C, H, W), H and W multiples of the patch size.
        mask_ratio: fraction r of patch tokens dropped after the position embedding; exactly
            ``floor(N * (1 - r))`` patches are kept (a static count, so shapes never change).
        mask_mode: ``"shared"`` (one permutation for the whole batch, official) or
            ``"per_sample"`` (an independent subset per image).
        generator: optional RNG for the mask.
        keep_idx: the patches to keep, (K,) for the whole batch or (B, K) per image, instead of a
            random draw (``mask_ratio``, ``mask_mode`` and ``generator`` are then ignored).

    Returns:
        ``(cls_prenorm, cls)``: the class token before and after the final LayerNorm, (B, D) each.
        The projection head consumes ``cls``; the official evaluation protocol uses ``cls_prenorm``.
    """
    x = embed_tokens(vit, images)
    if keep_idx is not None:
        x = apply_keep_indices(x, keep_idx.to(x.device))
    elif mask_ratio > 0:
        n = x.shape[1] - 1
        keep = keep_indices(
            mask_mode, n, num_kept(n, mask_ratio), batch_size=x.shape[0], device=x.device, generator=generator
        )
        x = apply_keep_indices(x, keep)
    x = forward_tokens(vit, x)
    cls_prenorm = x[:, 0]
    return cls_prenorm, vit.norm(cls_prenorm)


def num_patches(vit: VisionTransformer, height: int, width: int) -> int:
    """Patch tokens of an image of ``height x width`` (trailing rows/columns short of a patch dropped)."""
    p = vit.patch_embed.patch_size[0]
    return (height // p) * (width // p)


FEATURE_KINDS = ("cls_prenorm", "cls", "avgpool", "last4")


def features_problems(features: Any) -> list[str]:
    """What is wrong with a feature kind of :func:`extract` (the ``features`` config keys)."""
    if isinstance(features, str) and features in FEATURE_KINDS:
        return []
    return [f"features={features!r} is unknown; allowed: {', '.join(FEATURE_KINDS)}"]


def extract(vit: VisionTransformer, images: Tensor, features: str = "cls_prenorm") -> Tensor:
    """Frozen features for evaluation (no masking), (B, D) or (B, 4 D) for ``last4``.

    ``cls_prenorm``: class token of the last block before the final norm (official protocol);
    ``cls``: after the final norm (what HF ``ViTMSNModel`` returns); ``avgpool``: mean of the
    normalised patch tokens; ``last4``: the normalised class tokens of the last four blocks,
    concatenated (the DINO linear-evaluation features; earlier blocks keep more low-level detail,
    which helps small models and low-resolution images).
    """
    raise_problems(features_problems(features))
    x = vit.norm_pre(embed_tokens(vit, images))
    if features == "last4":
        if len(vit.blocks) < 4:
            raise ValueError(f"features='last4' needs at least 4 blocks; this encoder has {len(vit.blocks)}")
        cls_tokens = []
        for i, block in enumerate(vit.blocks):
            x = block(x)
            if i >= len(vit.blocks) - 4:
                cls_tokens.append(vit.norm(x[:, 0]))
        return torch.cat(cls_tokens, dim=1)
    x = vit.blocks(x)
    if features == "cls_prenorm":
        return x[:, 0]
    if features == "cls":
        return vit.norm(x[:, 0])
    return vit.norm(x)[:, 1:].mean(dim=1)
