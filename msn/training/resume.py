"""Which checkpoint a run resumes from: ``ckpt_path=last`` resolved to the newest complete
checkpoint of a run of the same kind, never a foreign one.

:class:`RunRecord` stores what the run is (architecture, data, views: :func:`run_signature`) and
where it lives in every checkpoint; :func:`resolve_ckpt_path` compares it with the run at hand.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from msn.checks import ConfigError
from msn.io.formats import read_checkpoint
from msn.training.checkpointing import checkpoint_is_complete

log = logging.getLogger("msn")

#: Key of the :class:`RunRecord` in a checkpoint dict.
RUN_KEY = "msn_run"
#: What makes two runs the same kind for ``ckpt_path=last``: the architecture, the data, the views.
SIGNATURE_KEYS = (
    "model.encoder",
    "model.head",
    "model.num_prototypes",
    "model.rand_views",
    "data.name",
    "data.root",
    "data.in_chans",
    "data.transform.rand_size",
    "data.transform.focal_size",
    "data.transform.rand_views",
    "data.transform.focal_views",
)
# The same keys as the module's own hyper-parameters, for checkpoints written without a RunRecord.
_HPARAM_KEYS = {
    "model.encoder": "encoder",
    "model.head": "head",
    "model.num_prototypes": "num_prototypes",
    "model.rand_views": "rand_views",
}


def run_signature(cfg: DictConfig) -> dict[str, Any]:
    """The values of :data:`SIGNATURE_KEYS` in a training config (resolved, plain containers)."""
    out = {}
    for key in SIGNATURE_KEYS:
        value = OmegaConf.select(cfg, key)
        out[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
    return out


class RunRecord(L.Callback):
    """Writes ``{"signature": ..., "output_dir": ...}`` of the run into every checkpoint."""

    def __init__(self, signature: dict[str, Any], output_dir: str) -> None:
        self.record = {"signature": dict(signature), "output_dir": str(output_dir)}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_KEY] = self.record


def recorded_run(path: str | os.PathLike) -> dict[str, Any]:
    """The :class:`RunRecord` of a checkpoint; for one written without it, the part of the
    signature that the module's hyper-parameters give, and the folder above ``checkpoints/``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if RUN_KEY in ckpt:
        return ckpt[RUN_KEY]
    hparams = ckpt.get("hyper_parameters") or {}
    signature = {key: hparams[name] for key, name in _HPARAM_KEYS.items() if name in hparams}
    return {"signature": signature, "output_dir": str(Path(path).resolve().parent.parent)}


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for name, sub in value.items() for k, v in _flat(sub, f"{prefix}.{name}").items()}
    return {prefix: list(value) if isinstance(value, tuple) else value}


def signature_differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """``"key: A there, B here"`` for each value that differs; keys one side lacks are skipped
    (a checkpoint without a record only knows the model's)."""
    a = {k: v for key, value in ours.items() for k, v in _flat(value, key).items()}
    b = {k: v for key, value in theirs.items() for k, v in _flat(value, key).items()}
    # A nested key on one side only (e.g. an encoder default left out of one config) is no difference.
    return [f"{k}: {b[k]!r} there, {a[k]!r} here" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]


def newest_resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete resume checkpoint in ``ckpt_dir``: ``last.ckpt`` or a step file.

    A step file can be newer than ``last.ckpt`` when a run was killed between writing the two;
    an incomplete file (copied or written by something without atomic saves) is passed over.
    """
    candidates = [ckpt_dir / "last.ckpt", *ckpt_dir.glob("step*.ckpt")]
    complete = []
    for path in candidates:
        if not path.is_file():
            continue
        if checkpoint_is_complete(path):
            complete.append(path)
        else:
            log.warning("ckpt_path=last: %s is incomplete, not resuming from it", path)
    return max(complete, key=lambda p: p.stat().st_mtime, default=None)


def resolve_ckpt_path(
    ckpt_path: str | None, output_dir: Path, signature: dict[str, Any] | None = None
) -> str | None:
    """Turn ``ckpt_path=last`` into a file: this run's newest resume checkpoint if there is one,
    else the newest among the earlier runs of the same name (sibling run dirs); see
    :func:`newest_resume_checkpoint`. With ``signature`` (:func:`msn.training.checkpointing.run_signature`)
    only a checkpoint of a run of the same kind is taken; when there are checkpoints but none of
    this kind, a :class:`~msn.training.config.ConfigError` names the newest and what differs. Anything else
    is returned as given (after checking that the file exists)."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path != "last":
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
        return str(ckpt_path)
    own = newest_resume_checkpoint(output_dir / "checkpoints")
    others = [newest_resume_checkpoint(d) for d in output_dir.parent.glob("*/checkpoints")]
    others = sorted((p for p in others if p is not None and p != own), key=lambda p: p.stat().st_mtime)
    candidates = [*([own] if own is not None else []), *reversed(others)]
    foreign = []
    for path in candidates:
        if signature is None:
            return str(path)
        record = recorded_run(path)
        differences = signature_differences(signature, record["signature"])
        if not differences:
            if foreign:
                log.info("ckpt_path=last: %s (newer runs of this name are of another kind)", path)
            return str(path)
        foreign.append((record["output_dir"], differences))
    if foreign:
        where, differences = foreign[0]
        raise ConfigError(
            [
                f"ckpt_path=last: the newest run named {output_dir.parent.name!r}, {where}, is not this "
                f"run's kind ({'; '.join(differences)}); this run is {output_dir}. Pass its checkpoint "
                "file as ckpt_path to resume it anyway, or set name= to keep the runs apart"
            ]
        )
    log.warning("ckpt_path=last: no checkpoint under %s; starting from scratch", output_dir.parent)
    return None


def check_resume_point(path: str) -> None:
    """Stop (:class:`~msn.training.config.ConfigError`) unless ``path`` is a ``train.py`` checkpoint with
    the training state to resume; read by the same reader as ``init_from`` and ``finetune.py``."""
    try:
        ckpt = read_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError([f"ckpt_path={path!r}: {err}"]) from err
    if not ckpt.training_state:
        raise ConfigError(
            [
                f"ckpt_path={path!r} is a {ckpt.format} checkpoint without the optimizer and loop state "
                f"that resuming needs; to start a new run from its weights use init_from={path}"
            ]
        )


def requested_ckpt_path(cfg_ckpt_path: str | None, environ: dict[str, str] | None = None) -> str | None:
    """``ckpt_path`` of the config, or ``last`` for a SLURM job that was requeued (its restart
    count is > 0) and names none: the requeued job reruns the same command line."""
    env = os.environ if environ is None else environ
    if cfg_ckpt_path in (None, "") and int(env.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        log.info(
            "requeued SLURM job (SLURM_RESTART_COUNT=%s): resuming with ckpt_path=last",
            env["SLURM_RESTART_COUNT"],
        )
        return "last"
    return cfg_ckpt_path
