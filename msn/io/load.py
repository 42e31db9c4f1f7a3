"""Checkpoints into models: a ready encoder, an :class:`~msn.module.MSNModule` to evaluate or to
continue training from, and the normalisation the encoder was trained with."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from msn import backbone
from msn.backbone import build_vit
from msn.data.transforms import default_mean_std
from msn.io.formats import ENCODERS, Checkpoint, read_checkpoint
from msn.module import MSNModule

log = logging.getLogger("msn")
_MAX_LISTED = 10


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
