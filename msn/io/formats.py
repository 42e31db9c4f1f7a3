"""Every checkpoint this project reads, told apart by content: :func:`read_checkpoint` returns a
:class:`Checkpoint`, the encoder weights under timm's key names plus whatever else the file holds
(projection heads, prototypes, a classifier and its labels). :mod:`msn.io.load` puts one into
models.

Formats read:

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
    (``architecture`` + ``model_args``) and its weights, as :mod:`msn.io.export` writes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from msn.io.keys import (
    HF_TO_TIMM_TOP,
    TIMM_MARKERS,
    hf_encoder_kwargs,
    hf_to_timm,
    infer_encoder_kwargs,
    is_state_dict,
    split_encoder,
    strip_prefixes,
)
from msn.module import DEFAULT_ENCODER

FORMATS = ("msn-lightning", "finetuned", "official", "hf", "timm")
ENCODERS = ("target_encoder", "encoder")
#: LayerNorm eps of our encoders (timm and the official code); HF's plain ViT default is 1e-12.
LAYER_NORM_EPS = 1e-6
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def encoder_problems(which: str | None) -> list[str]:
    """What is wrong with an ``encoder`` choice: one of :data:`ENCODERS`, or None for the target's."""
    if which is None or which in ENCODERS:
        return []
    return [f"encoder={which!r} is unknown; allowed: {', '.join(ENCODERS)} or null"]


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
        if problems := encoder_problems(which):
            raise ValueError(problems[0])
        if which is None:
            which = next(w for w in ENCODERS if w in self.encoders)
        if which not in self.encoders:
            raise ValueError(
                f"{self.source!r} ({self.format}) has no {which}; it holds: {', '.join(self.encoders)}"
            )
        return which, self.encoders[which]


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
        if not is_state_dict(state):
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
    enc, head, cls = split_encoder(strip_prefixes(state))
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
        if not is_state_dict(obj.get(which)):
            continue
        enc, head, cls = split_encoder(strip_prefixes(obj[which]))
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
        enc, _, cls = split_encoder(vit)
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
        f"state dict with {', '.join(TIMM_MARKERS)}; found {_summary(obj)})"
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
    if isinstance(obj, Mapping) and any(is_state_dict(obj.get(w)) for w in ENCODERS):
        return _read_official(obj, path, num_heads)
    # A bare state dict, possibly wrapped once (timm train scripts: state_dict; DeiT: model).
    inner = obj
    if isinstance(obj, Mapping) and not is_state_dict(obj):
        inner = next((obj[k] for k in ("state_dict", "model", "module") if is_state_dict(obj.get(k))), None)
    if is_state_dict(inner):
        stripped = strip_prefixes(inner)
        if all(k in stripped for k in TIMM_MARKERS):
            return _read_timm_state(inner, str(path), str(path), num_heads)
        if any(k.removeprefix("vit.") in HF_TO_TIMM_TOP for k in stripped):
            raise ValueError(
                f"ckpt={str(path)!r} holds Hugging Face ViTMSN weights without their config.json: pass "
                "the save_pretrained folder (config.json + weights) instead of the weights file"
            )
    raise _unknown(path, obj)
