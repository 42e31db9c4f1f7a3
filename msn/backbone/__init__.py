"""The encoder: timm ViTs of the size registry with MSN's masked forward (:mod:`.vit`) and the
packed forward of all crop sizes in one pass (:mod:`.packed`)."""

from msn.backbone.packed import PACKED_ATTENTION, block_diagonal_mask, encode_packed
from msn.backbone.vit import (
    FEATURE_KINDS,
    PATCH_SIZES,
    VIT_SIZES,
    ViTSize,
    build_vit,
    embed_tokens,
    encode,
    extract,
    features_problems,
    forward_tokens,
    grid_size,
    num_patches,
    pos_embed_for,
    resample_pos_embed,
)

__all__ = [
    "FEATURE_KINDS",
    "PACKED_ATTENTION",
    "PATCH_SIZES",
    "VIT_SIZES",
    "ViTSize",
    "block_diagonal_mask",
    "build_vit",
    "embed_tokens",
    "encode",
    "encode_packed",
    "extract",
    "features_problems",
    "forward_tokens",
    "grid_size",
    "num_patches",
    "pos_embed_for",
    "resample_pos_embed",
]
