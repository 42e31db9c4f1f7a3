"""A checkpoint's encoder in the formats of other libraries (what ``msn-export`` writes).

``format=hf``
    A ``transformers`` folder: ``config.json`` + ``model.safetensors`` (+ ``preprocessor_config.json``)
    of a ``ViTMSNModel`` (the target encoder), or of a ``ViTMSNForImageClassification`` with
    ``id2label`` for a fine-tuned checkpoint. The weights use the classic ViTMSN key layout of the
    released ``facebook/vit-msn-*`` models, which transformers 4 and 5 both read.
``format=timm``
    A folder that ``timm.create_model("local-dir:DIR", pretrained=True)`` loads: timm's
    ``config.json`` (``architecture`` + ``model_args`` + ``pretrained_cfg``) and a plain timm
    state dict in ``model.safetensors`` (``head.*`` included for a fine-tuned checkpoint).
``format=official``
    An official-format ``.pth.tar`` (``target_encoder``, ``encoder`` when known, ``prototypes``,
    ``epoch``, ... with ``module.``-prefixed keys and the projection head as ``fc.*``) that the
    official ``logistic_eval.py`` reads; no optimizer state.

Any checkpoint :func:`msn.io.read_checkpoint` reads can be exported to any format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from msn.io.formats import Checkpoint
from msn.io.keys import timm_to_hf
from msn.io.load import build_encoder

# timm model names of the registry sizes; model_args carry every setting, so the name only tells
# a reader the family (our nano/micro widths have no timm name).
_TIMM_NAMES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
}


def vit_dims(vit: VisionTransformer) -> dict[str, int]:
    """Architecture of a built encoder: width, depth, heads, MLP width, image/patch size, channels."""
    return {
        "embed_dim": vit.embed_dim,
        "depth": len(vit.blocks),
        "num_heads": vit.blocks[0].attn.num_heads,
        "mlp_dim": vit.blocks[0].mlp.fc1.out_features,
        "img_size": int(vit.patch_embed.img_size[0]),
        "patch_size": int(vit.patch_embed.patch_size[0]),
        "in_chans": vit.patch_embed.proj.in_channels,
    }


def hf_config(vit: VisionTransformer, id2label: dict[int, str] | None = None) -> dict[str, Any]:
    """``config.json`` of a ``ViTMSNModel`` (or ``ViTMSNForImageClassification`` with ``id2label``).

    ``layer_norm_eps`` is the encoder's (1e-6; HF's plain ViT default 1e-12 would change outputs).
    """
    d = vit_dims(vit)
    config: dict[str, Any] = {
        "architectures": ["ViTMSNForImageClassification" if id2label else "ViTMSNModel"],
        "model_type": "vit_msn",
        "hidden_size": d["embed_dim"],
        "num_hidden_layers": d["depth"],
        "num_attention_heads": d["num_heads"],
        "intermediate_size": d["mlp_dim"],
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": vit.norm.eps,
        "image_size": d["img_size"],
        "patch_size": d["patch_size"],
        "num_channels": d["in_chans"],
        "qkv_bias": True,
    }
    if id2label:
        config["id2label"] = {str(i): name for i, name in sorted(id2label.items())}
        config["label2id"] = {name: i for i, name in sorted(id2label.items())}
    return config


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses views that share memory (qkv chunks) or are not contiguous.
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}


def _save_safetensors(state: dict[str, Tensor], path: Path) -> None:
    """``safetensors.save_file``, with the permissions of any new file (it writes mode 0600)."""
    save_file(_contiguous(state), str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def save_hf(
    out_dir: Path,
    vit: VisionTransformer,
    classifier: dict[str, Tensor] | None = None,
    id2label: dict[int, str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> list[Path]:
    """Write a ``save_pretrained``-style folder for ``vit`` (and its classifier); returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if classifier is not None:
        labels = id2label or {i: f"LABEL_{i}" for i in range(classifier["weight"].shape[0])}
        state = timm_to_hf(vit.state_dict(), prefix="vit.")
        state.update({f"classifier.{k}": v for k, v in classifier.items()})
    else:
        labels = None
        state = timm_to_hf(vit.state_dict())
    d = vit_dims(vit)
    written = [out_dir / "config.json", out_dir / "model.safetensors"]
    _write_json(written[0], hf_config(vit, labels))
    _save_safetensors(state, written[1])
    if mean is not None and std is not None:
        written.append(out_dir / "preprocessor_config.json")
        _write_json(
            written[-1],
            {
                "image_processor_type": "ViTImageProcessor",
                "do_resize": True,
                "size": {"height": d["img_size"], "width": d["img_size"]},
                "resample": 3,  # bicubic, as our evaluation transform
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": list(mean),
                "image_std": list(std),
            },
        )
    return written


def timm_config(
    vit: VisionTransformer,
    arch: str,
    id2label: dict[int, str] | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, Any]:
    """timm's ``config.json``: ``timm.create_model(architecture, **model_args)`` rebuilds ``vit``."""
    d = vit_dims(vit)
    num_classes = len(id2label) if id2label else 0
    pretrained_cfg: dict[str, Any] = {
        "input_size": [d["in_chans"], d["img_size"], d["img_size"]],
        "interpolation": "bicubic",
        "mean": list(mean),
        "std": list(std),
        "crop_pct": 1.0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "fixed_input_size": True,
        "num_classes": num_classes,
    }
    if id2label:
        pretrained_cfg["label_names"] = [id2label[i] for i in range(num_classes)]
    return {
        "architecture": _TIMM_NAMES.get(arch, "vit_small_patch16_224"),
        "num_classes": num_classes,
        "num_features": d["embed_dim"],
        "global_pool": "token",
        "model_args": {
            "img_size": d["img_size"],
            "patch_size": d["patch_size"],
            "in_chans": d["in_chans"],
            "embed_dim": d["embed_dim"],
            "depth": d["depth"],
            "num_heads": d["num_heads"],
            "mlp_ratio": d["mlp_dim"] / d["embed_dim"],
            "qkv_bias": True,
            "class_token": True,
            "global_pool": "token",
        },
        "pretrained_cfg": pretrained_cfg,
    }


def save_timm(
    out_dir: Path,
    vit: VisionTransformer,
    arch: str,
    classifier: dict[str, Tensor] | None,
    id2label: dict[int, str] | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> list[Path]:
    """Write timm's local-folder format (config.json + model.safetensors); returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = dict(vit.state_dict())
    if classifier is not None:
        state.update({f"head.{k}": v for k, v in classifier.items()})
        id2label = id2label or {i: str(i) for i in range(classifier["weight"].shape[0])}
    else:
        id2label = None
    written = [out_dir / "config.json", out_dir / "model.safetensors"]
    _write_json(written[0], timm_config(vit, arch, id2label, mean, std))
    _save_safetensors(state, written[1])
    return written


def official_checkpoint(ckpt: Checkpoint, strict: bool = True) -> dict[str, Any]:
    """The official ``.pth.tar`` dict of a checkpoint (see the module docstring)."""
    out: dict[str, Any] = {}
    for which, head in (("encoder", "head"), ("target_encoder", "target_head")):
        if which not in ckpt.encoders:
            continue
        state = {f"module.{k}": v for k, v in build_encoder(ckpt, which, strict=strict).state_dict().items()}
        state.update({f"module.fc.{k}": v for k, v in ckpt.heads.get(head, {}).items()})
        out[which] = state
    if ckpt.prototypes is not None:
        out["prototypes"] = ckpt.prototypes
    out.update(ckpt.meta)
    hp = ckpt.hparams or {}
    if "epoch" not in out and "global_step" in ckpt.meta:
        out["epoch"] = ckpt.meta["global_step"]
    if isinstance(hp.get("loss"), dict) and "temperature" in hp["loss"]:
        out.setdefault("temperature", hp["loss"]["temperature"])
    if isinstance(hp.get("optim"), dict) and "ref_lr" in hp["optim"]:
        out.setdefault("lr", hp["optim"]["ref_lr"])
    out.pop("global_step", None)
    return out
