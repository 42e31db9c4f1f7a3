"""Checkpoints in and out: msn-lightning, official MSN, Hugging Face ViTMSN and timm formats.

One entry point, :func:`read_checkpoint`, looks at a path and returns a :class:`Checkpoint`: the
encoder weights under timm's key names (which are also the official ones, without ``module.``),
plus whatever else the file holds (projection heads, prototypes, a classifier and its labels).
Everything else builds on it: :func:`build_encoder` (a ready ViT, position embeddings resampled
to another image size when asked), :func:`msn_module` (an :class:`~msn.module.MSNModule` for the
evaluation modes of ``finetune.py``) and :func:`init_msn_module` (``train.py init_from=``).

Formats read (REFERENCE §5):

``msn-lightning``
    A Lightning checkpoint written by ``train.py`` (``encoder.*``, ``target_encoder.*``,
    ``head.*``, ``target_head.*``, ``prototypes``, ``hyper_parameters``).
``finetuned``
    A Lightning checkpoint written by ``finetune.py mode=finetune`` (``vit.*`` with a ``vit.head``
    classifier, ``hyper_parameters`` with ``num_classes``).
``official``
    The official ``.pth.tar``: a dict with ``target_encoder`` and/or ``encoder`` state dicts
    (``module.`` prefix or not, projection head ``fc.*`` or not) and optionally ``prototypes``.
``hf``
    A ``save_pretrained`` folder of ``ViTMSNModel`` or ``ViTMSNForImageClassification``
    (``config.json`` + ``model.safetensors``, sharded safetensors or ``pytorch_model.bin``), in
    the classic layout (``encoder.layer.{i}.attention.attention.query``) or the transformers 5
    one (``layers.{i}.attention.q_proj``). Read without importing transformers.
``timm``
    A plain timm ViT state dict (``.pth``/``.bin``/``.safetensors``, possibly wrapped in
    ``state_dict``/``model`` and prefixed ``module.``), or a folder with timm's ``config.json``
    (``architecture`` + ``model_args``) and its weights, as :mod:`msn.export` writes it.

Hugging Face splits the fused ``qkv`` projection by rows: ``[0:D]`` query, ``[D:2D]`` key,
``[2D:3D]`` value; :func:`timm_to_hf` and :func:`hf_to_timm` convert both ways.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from msn import backbone
from msn.backbone import VIT_SIZES, build_vit
from msn.data.transforms import default_mean_std

log = logging.getLogger("msn")

FORMATS = ("msn-lightning", "finetuned", "official", "hf", "timm")
ENCODERS = ("target_encoder", "encoder")
#: LayerNorm eps of our encoders (timm and the official code); HF's plain ViT default is 1e-12.
LAYER_NORM_EPS = 1e-6
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_MAX_LISTED = 10


@dataclass
class Checkpoint:
    """What a checkpoint file holds, in this project's terms.

    Attributes:
        format: one of :data:`FORMATS`.
        source: the path that was read.
        weights_file: the file the weights came from (a folder's weights file), for cache keys.
        encoder_kwargs: keyword arguments of :func:`msn.backbone.build_vit` that rebuild the encoder.
        encoders: ``{"target_encoder" | "encoder": state dict}`` under timm's key names.
        heads: ``{"target_head" | "head": state dict}`` of the projection head (``fc1``, ``bn1``, ...).
        prototypes: ``(K, d)`` or ``None``.
        classifier: ``{"weight": (C, D), "bias": (C,)}`` on the normalised class token, or ``None``.
        id2label: class names of the classifier, or ``None``.
        layer_norm_eps: eps of every LayerNorm of the encoder.
        hparams: the Lightning ``hyper_parameters`` (msn-lightning and finetuned), else ``None``.
        unexpected: source keys that were not understood (reported; an error when loading strictly).
        meta: extra scalars of the file (official ``epoch``, ``lr``, ...).
        training_state: the file also holds the optimizer and loop state that resuming needs
            (a ``train.py`` checkpoint).
    """

    format: str
    source: str
    weights_file: str
    encoder_kwargs: dict[str, Any]
    encoders: dict[str, dict[str, Tensor]]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    prototypes: Tensor | None = None
    classifier: dict[str, Tensor] | None = None
    id2label: dict[int, str] | None = None
    layer_norm_eps: float = LAYER_NORM_EPS
    hparams: dict[str, Any] | None = None
    unexpected: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    training_state: bool = False

    def encoder_state(self, which: str | None = None) -> tuple[str, dict[str, Tensor]]:
        """``(name, state dict)`` of the encoder to use: ``which``, or the target encoder when
        present (the one the official evaluation uses), else the anchor encoder.

        Raises:
            ValueError: ``which`` is unknown or not in this checkpoint.
        """
        if which is not None and which not in ENCODERS:
            raise ValueError(f"encoder={which!r} is unknown; allowed: {', '.join(ENCODERS)}")
        if which is None:
            which = next(w for w in ENCODERS if w in self.encoders)
        if which not in self.encoders:
            raise ValueError(
                f"{self.source!r} ({self.format}) has no {which}; it holds: {', '.join(self.encoders)}"
            )
        return which, self.encoders[which]


# ----------------------------------------------------------------------------------------------
# Key names
# ----------------------------------------------------------------------------------------------
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
_HF_TO_TIMM_TOP = {hf: timm for timm, hf in _TOP_KEYS}
_HF_TO_TIMM_BLOCK = {hf: timm for timm, *names in _BLOCK_KEYS for hf in names}
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
# Known HF keys that carry nothing for the encoder (ViTMSNModel(use_mask_token=True)).
_HF_IGNORED = ("embeddings.mask_token",)
_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
# Keys of a timm ViT state dict, used to recognise one (after prefixes are stripped).
_TIMM_MARKERS = ("cls_token", "pos_embed", "patch_embed.proj.weight")
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
        if name in _HF_TO_TIMM_TOP:
            out[_HF_TO_TIMM_TOP[name]] = value
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


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
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


def _split_encoder(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
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


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


# ----------------------------------------------------------------------------------------------
# Architecture from weights / configs
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        reason = " ".join(str(err).split())  # torch's messages span lines; ours is one
        raise ValueError(f"ckpt={str(path)!r} is not a readable PyTorch checkpoint ({reason})") from err


def _load_weights_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"ckpt={str(path)!r} is not a readable safetensors file ({err})") from err
    return _torch_load(path)


def _hf_weights(folder: Path) -> tuple[dict[str, Tensor], Path]:
    """All tensors of an HF folder (single or sharded safetensors, or pytorch_model.bin)."""
    for name in HF_WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(_load_weights_file(folder / shard))
            return state, path
        state = _load_weights_file(path)
        if not _is_state_dict(state):
            raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
        return state, path
    raise FileNotFoundError(
        f"ckpt={str(folder)!r}: no weights file in the folder (looked for {', '.join(HF_WEIGHTS)})"
    )


def _read_hf(folder: Path, config: Mapping[str, Any]) -> Checkpoint:
    kwargs = hf_encoder_kwargs(config)  # a wrong config fails before the weights are read
    raw, weights = _hf_weights(folder)
    state, unexpected = hf_to_timm(raw, qkv_bias=bool(config.get("qkv_bias", True)))
    classifier = {
        k.split(".")[-1]: v for k, v in raw.items() if k.removeprefix("vit.").startswith("classifier.")
    }
    id2label = None
    if classifier and "id2label" in config:
        id2label = {int(k): str(v) for k, v in config["id2label"].items()}
    return Checkpoint(
        format="hf",
        source=str(folder),
        weights_file=str(weights),
        encoder_kwargs=kwargs,
        encoders={"target_encoder": state},
        classifier=classifier or None,
        id2label=id2label,
        layer_norm_eps=float(config.get("layer_norm_eps", LAYER_NORM_EPS)),  # ViTMSNConfig default
        unexpected=unexpected,
    )


def _read_timm_folder(folder: Path, config: Mapping[str, Any], num_heads: int | None) -> Checkpoint:
    raw, weights = _hf_weights(folder)
    args = dict(config.get("model_args") or {})
    if num_heads is None and "num_heads" in args:  # the config knows the heads; the weights do not
        num_heads = int(args["num_heads"])
    ckpt = _read_timm_state(raw, str(folder), str(weights), num_heads)
    labels = (config.get("pretrained_cfg") or {}).get("label_names") or config.get("label_names")
    if ckpt.classifier is not None and labels:
        ckpt.id2label = dict(enumerate(map(str, labels)))
    return ckpt


def _read_timm_state(
    state: Mapping[str, Tensor], source: str, weights: str, num_heads: int | None
) -> Checkpoint:
    enc, head, cls = _split_encoder(_strip_prefixes(state))
    return Checkpoint(
        format="timm",
        source=source,
        weights_file=weights,
        encoder_kwargs=infer_encoder_kwargs(enc, num_heads),
        encoders={"target_encoder": enc},
        heads={"target_head": head} if head else {},
        classifier=cls or None,
    )


def _read_official(obj: Mapping[str, Any], path: Path, num_heads: int | None) -> Checkpoint:
    encoders: dict[str, dict[str, Tensor]] = {}
    heads: dict[str, dict[str, Tensor]] = {}
    unexpected: list[str] = []
    for which, head_name in (("target_encoder", "target_head"), ("encoder", "head")):
        if not _is_state_dict(obj.get(which)):
            continue
        enc, head, cls = _split_encoder(_strip_prefixes(obj[which]))
        encoders[which] = enc
        unexpected += [f"{which}: head.{k}" for k in cls]  # an MSN encoder has no classifier
        if head:
            heads[head_name] = head
    first = next(iter(encoders.values()))
    prototypes = obj.get("prototypes")
    meta = {k: obj[k] for k in ("epoch", "loss", "batch_size", "world_size", "lr", "temperature") if k in obj}
    return Checkpoint(
        format="official",
        source=str(path),
        weights_file=str(path),
        encoder_kwargs=infer_encoder_kwargs(first, num_heads),
        encoders=encoders,
        heads=heads,
        prototypes=prototypes if isinstance(prototypes, Tensor) else None,
        unexpected=unexpected,
        meta=meta,
    )


def _prefixed(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _read_lightning(obj: Mapping[str, Any], path: Path) -> Checkpoint | None:
    from msn.module import DEFAULT_ENCODER

    state, hparams = obj["state_dict"], dict(obj["hyper_parameters"])
    kwargs = {**DEFAULT_ENCODER, **dict(hparams.get("encoder") or {})}
    if "prototypes" in state and "target_encoder.cls_token" in state:
        return Checkpoint(
            format="msn-lightning",
            source=str(path),
            weights_file=str(path),
            encoder_kwargs=kwargs,
            encoders={w: _prefixed(state, f"{w}.") for w in ENCODERS},
            heads={h: _prefixed(state, f"{h}.") for h in ("target_head", "head")},
            prototypes=state["prototypes"],
            hparams=hparams,
            meta={k: obj[k] for k in ("epoch", "global_step") if k in obj},
            training_state=all(k in obj for k in ("optimizer_states", "loops", "pytorch-lightning_version")),
        )
    if "num_classes" in hparams and "vit.head.weight" in state:
        vit = _prefixed(state, "vit.")
        enc, _, cls = _split_encoder(vit)
        labels = hparams.get("id2label")
        return Checkpoint(
            format="finetuned",
            source=str(path),
            weights_file=str(path),
            encoder_kwargs={k: v for k, v in kwargs.items() if k != "drop_path_rate"},
            encoders={"target_encoder": enc},
            classifier=cls,
            id2label={int(k): str(v) for k, v in labels.items()} if labels else None,
            hparams=hparams,
        )
    return None


def _summary(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return str(sorted(map(str, obj))[:8])
    return type(obj).__name__


def _unknown(path: Path, obj: Any) -> ValueError:
    return ValueError(
        f"ckpt={str(path)!r} is not an msn-lightning pre-training checkpoint nor an official MSN, Hugging "
        "Face ViTMSN or timm ViT checkpoint (expected a Lightning checkpoint with target_encoder.* and "
        "prototypes, a dict with target_encoder/encoder state dicts, a save_pretrained folder, or a ViT "
        f"state dict with {', '.join(_TIMM_MARKERS)}; found {_summary(obj)})"
    )


def detect_format(path: str | Path) -> str:
    """The format of a checkpoint path (one of :data:`FORMATS`); see :func:`read_checkpoint`."""
    return read_checkpoint(path).format


def read_checkpoint(path: str | Path, num_heads: int | None = None) -> Checkpoint:
    """Read any supported checkpoint; the format is told from the file's content, not its name.

    Args:
        path: a file (Lightning ``.ckpt``, official ``.pth.tar``, timm ``.pth``/``.safetensors``)
            or a folder (HF ``save_pretrained``, or timm's ``config.json`` + weights).
        num_heads: attention heads, for official/timm weights of a width outside the size
            registry (the weights do not tell it).

    Raises:
        FileNotFoundError: no such file or folder, or a folder without config.json / weights.
        ValueError: unreadable, or not one of the formats (the message says what was found).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"ckpt={str(path)!r} is a folder without config.json (expected a Hugging Face "
                "save_pretrained folder or a timm folder)"
            )
        try:
            config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(cfg_file)!r} is not valid JSON ({err})") from err
        if "architecture" in config:
            return _read_timm_folder(path, config, num_heads)
        return _read_hf(path, config)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={str(path)!r}: no such checkpoint file")
    obj = _load_weights_file(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and "hyper_parameters" in obj:
        ckpt = _read_lightning(obj, path)
        if ckpt is not None:
            return ckpt
        raise _unknown(path, obj)
    if isinstance(obj, Mapping) and any(_is_state_dict(obj.get(w)) for w in ENCODERS):
        return _read_official(obj, path, num_heads)
    # A bare state dict, possibly wrapped once (timm train scripts: state_dict; DeiT: model).
    inner = obj
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        inner = next((obj[k] for k in ("state_dict", "model", "module") if _is_state_dict(obj.get(k))), None)
    if _is_state_dict(inner):
        stripped = _strip_prefixes(inner)
        if all(k in stripped for k in _TIMM_MARKERS):
            return _read_timm_state(inner, str(path), str(path), num_heads)
        if any(k.removeprefix("vit.") in _HF_TO_TIMM_TOP for k in stripped):
            raise ValueError(
                f"ckpt={str(path)!r} holds Hugging Face ViTMSN weights without their config.json: pass "
                "the save_pretrained folder (config.json + weights) instead of the weights file"
            )
    raise _unknown(path, obj)


def data_stats(ckpt: Checkpoint, mean: Any = None, std: Any = None) -> tuple[list[float], list[float]]:
    """Normalisation of the encoder's inputs: given > fine-tuning hparams > the run's
    ``.hydra/config.yaml`` beside ``checkpoints/`` > the channel default (ImageNet, or 0.5)."""
    in_chans = ckpt.encoder_kwargs.get("in_chans", 3)
    if mean is None or std is None:
        hp = ckpt.hparams or {}
        run_cfg = Path(ckpt.source).resolve().parent.parent / ".hydra" / "config.yaml"
        if hp.get("mean") is not None and hp.get("std") is not None:
            mean, std = hp["mean"], hp["std"]
        elif run_cfg.is_file():
            data = OmegaConf.load(run_cfg).get("data") or {}
            mean, std = data.get("mean"), data.get("std")
    if mean is None or std is None:
        mean, std = default_mean_std(in_chans)
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean={mean} / std={std} need one value per channel ({in_chans})")
    return mean, std


# ----------------------------------------------------------------------------------------------
# Loading into models
# ----------------------------------------------------------------------------------------------
def _listed(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def resample_pos_embed(pos_embed: Tensor, grid: Sequence[int]) -> Tensor:
    """Position table ``(1, 1 + N, D)`` of a square grid resampled to ``grid`` (rows, cols).

    The encoder's own resampling (:func:`msn.backbone.resample_pos_embed`), so a checkpoint loaded
    at another size computes what the original encoder computes on images of that size.
    """
    n = pos_embed.shape[1] - 1
    old = round(n**0.5)
    if old * old != n:
        raise ValueError(f"pos_embed has {n} patch positions: not a square grid")
    return backbone.resample_pos_embed(pos_embed, (old, old), grid)


def set_layer_norm_eps(module: nn.Module, eps: float) -> None:
    """Set the eps of every LayerNorm in ``module`` (HF configs may use another value than 1e-6)."""
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps


@torch.no_grad()
def load_encoder_state(
    vit: VisionTransformer,
    state: Mapping[str, Tensor],
    *,
    what: str = "encoder",
    strict: bool = True,
    unexpected_source: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """Copy a timm-named state dict into ``vit``, resampling ``pos_embed`` to its patch grid.

    Args:
        vit: the encoder to fill.
        state: timm-named weights (as :class:`Checkpoint` holds them).
        what: the name used in messages (e.g. ``"target_encoder of official.pth.tar"``).
        strict: raise on missing or unexpected keys; otherwise they are logged.
        unexpected_source: source keys the reader did not understand (counted as unexpected).

    Returns:
        ``(missing, unexpected)`` key lists (both empty when ``strict``).

    Raises:
        ValueError: a shape differs other than the position table's grid (e.g. another patch
            size, width or channel count), or keys are missing/unexpected with ``strict``.
    """
    state = dict(state)
    own = vit.state_dict()
    theirs = state.get("pos_embed")
    if (
        theirs is not None
        and theirs.shape != own["pos_embed"].shape
        and theirs.shape[-1] == own["pos_embed"].shape[-1]
    ):
        # Another image size: same table on another grid (a width mismatch is reported below).
        state["pos_embed"] = resample_pos_embed(theirs, vit.patch_embed.grid_size)
    wrong = [
        f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(f"{what}: shapes differ: " + "; ".join(wrong[:_MAX_LISTED]))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own)) + list(unexpected_source)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
        msg = f"{what}: " + "; ".join(parts)
        if strict:
            raise ValueError(msg + " (strict=false loads the rest anyway)")
        log.warning(msg)
    vit.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing, unexpected


def build_encoder(
    ckpt: Checkpoint,
    which: str | None = None,
    img_size: int | None = None,
    strict: bool = True,
    drop_path_rate: float = 0.0,
) -> VisionTransformer:
    """A ready encoder from a checkpoint (eval mode): ``which`` encoder (default: the target).

    ``img_size`` builds it for another image size, with the position table resampled.
    """
    name, state = ckpt.encoder_state(which)
    kwargs = {**ckpt.encoder_kwargs, "drop_path_rate": drop_path_rate}
    if img_size is not None:
        kwargs["img_size"] = int(img_size)
    vit = build_vit(**kwargs)
    set_layer_norm_eps(vit, ckpt.layer_norm_eps)
    load_encoder_state(
        vit, state, what=f"{name} of {ckpt.source}", strict=strict, unexpected_source=ckpt.unexpected
    )
    return vit.eval()


def _load_head(head: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    own = head.state_dict()
    problems = [
        f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = sorted(set(own) - set(state))
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if problems:
        raise ValueError(
            f"{what} does not fit the model's projection head (model.head.hidden_dim / out_dim / use_bn): "
            + "; ".join(problems[:3])
        )
    head.load_state_dict({k: v for k, v in state.items() if k in own})


def init_msn_module(model: Any, ckpt: Checkpoint | str | Path, strict: bool = True) -> dict[str, str]:
    """Initialise an :class:`~msn.module.MSNModule` from any checkpoint (``train.py init_from=``).

    Each part of the module takes the matching part of the checkpoint; a missing anchor part is
    copied from the target one (MSN starts the anchor as a copy of the target), so a released
    official checkpoint (target encoder + prototypes) and a full one (encoder + target +
    prototypes) both continue from where they stopped. Backbone-only formats (HF, timm) fill both
    encoders; heads and prototypes then keep their fresh initialisation. Position embeddings are
    resampled when the image size differs.

    Returns:
        ``{part: what it was loaded from}``, e.g. ``{"encoder": "encoder", "prototypes": "fresh"}``.

    Raises:
        ValueError: a part does not fit (another width, head size or number of prototypes).
    """
    if not isinstance(ckpt, Checkpoint):
        ckpt = read_checkpoint(ckpt)
    done: dict[str, str] = {}
    with torch.no_grad():
        for which in ENCODERS:
            name, state = ckpt.encoder_state(which if which in ckpt.encoders else None)
            module = getattr(model, which)
            set_layer_norm_eps(module, ckpt.layer_norm_eps)
            load_encoder_state(
                module,
                state,
                what=f"{name} of {ckpt.source}",
                strict=strict,
                unexpected_source=ckpt.unexpected,
            )
            done[which] = name
        for head in ("target_head", "head"):
            src = head if head in ckpt.heads else next(iter(ckpt.heads), None)
            if src is None:
                done[head] = "fresh"
                continue
            _load_head(getattr(model, head), ckpt.heads[src], f"{src} of {ckpt.source}")
            done[head] = src
        if ckpt.prototypes is None:
            done["prototypes"] = "fresh"
        elif ckpt.prototypes.shape != model.prototypes.shape:
            raise ValueError(
                f"prototypes of {ckpt.source}: {tuple(ckpt.prototypes.shape)} in the checkpoint, "
                f"{tuple(model.prototypes.shape)} in the model (model.num_prototypes x model.head.out_dim)"
            )
        else:
            model.prototypes.copy_(ckpt.prototypes)
            done["prototypes"] = "prototypes"
    return done


def msn_module(ckpt: Checkpoint, device: str | torch.device = "cpu", strict: bool = True) -> Any:
    """An :class:`~msn.module.MSNModule` (eval mode) around a checkpoint's encoders, for the
    evaluation modes of ``finetune.py``; built from ``hyper_parameters`` for our own pre-training
    checkpoints, else with a head and prototypes the size of the checkpoint's (small if none)."""
    from msn.module import MSNModule

    if ckpt.format == "msn-lightning":
        model = MSNModule(**ckpt.hparams)
        init_msn_module(model, ckpt, strict=strict)
        return model.to(device).eval()
    head = next(iter(ckpt.heads.values()), None)
    head_cfg = {"hidden_dim": 16, "out_dim": 16}
    if head is not None and "fc1.weight" in head and "fc3.weight" in head:
        head_cfg = {
            "hidden_dim": head["fc1.weight"].shape[0],
            "out_dim": head["fc3.weight"].shape[0],
            "use_bn": "bn1.weight" in head,
        }
    num_prototypes = ckpt.prototypes.shape[0] if ckpt.prototypes is not None else 16
    model = MSNModule(encoder=ckpt.encoder_kwargs, head=head_cfg, num_prototypes=num_prototypes)
    init_msn_module(model, ckpt, strict=strict)
    return model.to(device).eval()


__all__ = [
    "ENCODERS",
    "FORMATS",
    "Checkpoint",
    "build_encoder",
    "data_stats",
    "detect_format",
    "hf_encoder_kwargs",
    "hf_to_timm",
    "infer_encoder_kwargs",
    "init_msn_module",
    "load_encoder_state",
    "msn_module",
    "read_checkpoint",
    "resample_pos_embed",
    "set_layer_norm_eps",
    "timm_to_hf",
    "vit_kwargs",
]
