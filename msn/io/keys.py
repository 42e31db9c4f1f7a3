"""What the names and shapes of a ViT state dict say: timm <-> Hugging Face key maps, the wrapper
prefixes of other trainers, and the encoder architecture read from weights or a config.json.

timm's names are also the official MSN ones (behind ``module.``). Hugging Face splits the fused
``qkv`` projection by rows: ``[0:D]`` query, ``[D:2D]`` key, ``[2D:3D]`` value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from msn.backbone import VIT_SIZES

# One entry per block parameter: (timm / official module, classic HF module, transformers-5 HF
# module). q, k and v are the three row blocks of timm's fused ``attn.qkv``.
_BLOCK_KEYS: tuple[tuple[str, str, str], ...] = (
    ("norm1", "layernorm_before", "layernorm_before"),
    ("attn.q", "attention.attention.query", "attention.q_proj"),
    ("attn.k", "attention.attention.key", "attention.k_proj"),
    ("attn.v", "attention.attention.value", "attention.v_proj"),
    ("attn.proj", "attention.output.dense", "attention.o_proj"),
    ("norm2", "layernorm_after", "layernorm_after"),
    ("mlp.fc1", "intermediate.dense", "mlp.fc1"),
    ("mlp.fc2", "output.dense", "mlp.fc2"),
)
_TOP_KEYS: tuple[tuple[str, str], ...] = (
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
    ("norm.weight", "layernorm.weight"),
    ("norm.bias", "layernorm.bias"),
)
HF_TO_TIMM_TOP = {hf: timm for timm, hf in _TOP_KEYS}
_HF_TO_TIMM_BLOCK = {hf: timm for timm, *names in _BLOCK_KEYS for hf in names}
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
# Known HF keys that carry nothing for the encoder (ViTMSNModel(use_mask_token=True)).
_HF_IGNORED = ("embeddings.mask_token",)
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
# Keys of a timm ViT state dict, used to recognise one (after prefixes are stripped).
TIMM_MARKERS = ("cls_token", "pos_embed", "patch_embed.proj.weight")
_PREFIXES = ("module.", "model.", "backbone.")


def timm_to_hf(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Encoder state dict under timm names -> HF ViTMSN names (classic layout, the one of the
    released ``facebook/vit-msn-*`` weights, which every transformers version reads).

    ``blocks.{i}.attn.qkv`` (3D, ...) is split by rows into query, key and value. ``prefix``
    (e.g. ``"vit."`` for ``ViTMSNForImageClassification``) goes in front of every key.

    Raises:
        KeyError: a key is not part of a plain timm ViT encoder.
    """
    top = dict(_TOP_KEYS)
    block = {timm: classic for timm, classic, _ in _BLOCK_KEYS}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in top:
            out[prefix + top[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            raise KeyError(f"{key!r} is not a key of a plain timm ViT encoder")
        i, module, kind = m.groups()
        if module == "attn.qkv":
            for part, chunk in zip(("attn.q", "attn.k", "attn.v"), value.chunk(3, dim=0)):
                out[f"{prefix}encoder.layer.{i}.{block[part]}.{kind}"] = chunk.contiguous()
        elif module in block:
            out[f"{prefix}encoder.layer.{i}.{block[module]}.{kind}"] = value
        else:
            raise KeyError(f"{key!r} is not a key of a plain timm ViT encoder")
    return out


def hf_to_timm(state: Mapping[str, Tensor], qkv_bias: bool = True) -> tuple[dict[str, Tensor], list[str]]:
    """HF ViTMSN encoder state dict (either layout, ``vit.`` prefix or not) -> timm names.

    Query, key and value are concatenated by rows into ``attn.qkv``; without qkv biases
    (``qkv_bias=False``) zero biases are added, which computes the same function.

    Returns:
        ``(state, unexpected)``: the timm state dict and the keys that were not understood.
        ``classifier.*`` and ``embeddings.mask_token`` are neither.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        name = key.removeprefix("vit.")
        if name.startswith("classifier.") or name in _HF_IGNORED:
            continue
        if name in HF_TO_TIMM_TOP:
            out[HF_TO_TIMM_TOP[name]] = value
            continue
        m = _HF_LAYER.fullmatch(name)
        module = _HF_TO_TIMM_BLOCK.get(m.group(2)) if m else None
        if module is None:
            unexpected.append(key)
        elif module in ("attn.q", "attn.k", "attn.v"):
            qkv.setdefault((m.group(1), m.group(3)), {})[module] = value
        else:
            out[f"blocks.{m.group(1)}.{module}.{m.group(3)}"] = value
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"attn.q", "attn.k", "attn.v"}:
            continue  # incomplete: reported as missing attn.qkv when loaded
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["attn.q"], parts["attn.k"], parts["attn.v"]])
    if not qkv_bias:
        for (i, kind), parts in list(qkv.items()):
            if kind == "weight" and f"blocks.{i}.attn.qkv.bias" not in out:
                out[f"blocks.{i}.attn.qkv.bias"] = parts["attn.q"].new_zeros(3 * parts["attn.q"].shape[0])
    return out, unexpected


def strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop wrapper prefixes (``module.`` of DDP, ``model.``, ``backbone.``) shared by all keys."""
    out = dict(state)
    changed = True
    while changed and out:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in out):
                out = {k[len(p) :]: v for k, v in out.items()}
                changed = True
    return out


def split_encoder(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """A timm/official encoder state dict -> ``(encoder, projection head fc.*, classifier head.*)``."""
    enc, head, cls = {}, {}, {}
    for key, value in state.items():
        if key.startswith("fc."):
            head[key[3:]] = value
        elif key in ("head.weight", "head.bias"):
            cls[key[5:]] = value
        else:
            enc[key] = value
    return enc, head, cls


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def vit_kwargs(
    embed_dim: int,
    depth: int,
    num_heads: int,
    patch_size: int,
    img_size: int,
    in_chans: int,
    mlp_ratio: float = 4.0,
) -> dict[str, Any]:
    """:func:`~msn.backbone.build_vit` kwargs: the registry size of that width, overrides if needed."""
    arch = next((n for n, s in VIT_SIZES.items() if s.embed_dim == embed_dim), "vit_small")
    size = VIT_SIZES[arch]
    kwargs: dict[str, Any] = {
        "arch": arch,
        "patch_size": patch_size,
        "img_size": img_size,
        "in_chans": in_chans,
    }
    if size.embed_dim != embed_dim:
        kwargs["embed_dim"] = embed_dim
    if size.depth != depth:
        kwargs["depth"] = depth
    if size.num_heads != num_heads:
        kwargs["num_heads"] = num_heads
    if mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = mlp_ratio
    return kwargs


def infer_encoder_kwargs(state: Mapping[str, Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """Encoder architecture from a timm-named state dict.

    Width, depth, patch size, channels, MLP ratio and (square) image size are read from the
    shapes. The number of heads is not in the weights: it is ``num_heads`` when given, else the
    one of the registry size of that width (the standard ViT/DeiT sizes of the released
    checkpoints: 192 -> 3, 384 -> 6, 768 -> 12, 1024 and 1280 -> 16).

    Raises:
        ValueError: a tensor the architecture is read from is missing, the position table is not
            a square grid, or the heads cannot be told.
    """
    missing = [k for k in ("pos_embed", "patch_embed.proj.weight") if k not in state]
    if missing:
        raise ValueError(f"cannot tell the encoder architecture: no {' / '.join(missing)} in the weights")
    embed_dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise ValueError("cannot tell the encoder architecture: no blocks.{i}.* weights")
    num_patches = state["pos_embed"].shape[1] - 1
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"pos_embed has {num_patches} patch positions: not a square grid")
    if num_heads is None:
        by_width = {s.embed_dim: s.num_heads for s in VIT_SIZES.values()}
        if embed_dim not in by_width:
            raise ValueError(
                f"cannot tell the number of attention heads of a {embed_dim}-wide encoder from its "
                "weights; give it explicitly (num_heads=...)"
            )
        num_heads = by_width[embed_dim]
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / embed_dim if fc1 is not None else 4.0
    return vit_kwargs(embed_dim, depth, num_heads, patch, grid * patch, in_chans, mlp_ratio)


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"config.json {name}={list(value)}: only square sizes are supported")
        value = value[0]
    return int(value)


def hf_encoder_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`~msn.backbone.build_vit` kwargs from a ViTMSN ``config.json``.

    Raises:
        ValueError: not a ViTMSN config, or a setting our encoder does not have.
    """
    if config.get("model_type") != "vit_msn":
        raise ValueError(f"config.json model_type={config.get('model_type')!r}; expected 'vit_msn'")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"config.json hidden_act={config['hidden_act']!r}; only 'gelu' is supported")
    hidden = int(config.get("hidden_size", 768))
    return vit_kwargs(
        embed_dim=hidden,
        depth=int(config.get("num_hidden_layers", 12)),
        num_heads=int(config.get("num_attention_heads", 12)),
        patch_size=_square(config.get("patch_size", 16), "patch_size"),
        img_size=_square(config.get("image_size", 224), "image_size"),
        in_chans=int(config.get("num_channels", 3)),
        mlp_ratio=int(config.get("intermediate_size", 4 * hidden)) / hidden,
    )
