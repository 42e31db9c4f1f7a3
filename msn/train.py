"""MSN pre-training entry point (``python train.py`` / ``msn-train``), configured by Hydra.

Builds everything from the config with ``hydra.utils.instantiate``, fits, then evaluates the
target encoder with the official low-shot protocol and prints the table.

Failures end with one message and an exit code: 2 for an invalid config (before any compute), 1
for a run stopped by a guard (non-finite loss, collapse with ``stop``, unreadable images with
``on_bad_image=raise``, a checkpoint that cannot be written); a preempted run (SIGTERM /
SIGUSR1) saves its checkpoint and exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from msn.checkpointing import CheckpointWriteError, ResumeCheckpoint, checkpoint_is_complete
from msn.config import ConfigError, validate_config
from msn.data.datasets import BadImageError, bad_image_summary
from msn.evaluate import MSN_ROW, lowshot_from_config
from msn.interop import init_msn_module
from msn.reliability import PreemptionHandler, TrainingAborted

log = logging.getLogger("msn")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


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


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """Turn ``ckpt_path=last`` into a file: this run's newest resume checkpoint if there is one,
    else the newest among the earlier runs of the same name (sibling run dirs); see
    :func:`newest_resume_checkpoint`. Anything else is returned as given (after checking that the
    file exists)."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path != "last":
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
        return str(ckpt_path)
    own = newest_resume_checkpoint(output_dir / "checkpoints")
    if own is not None:
        return str(own)
    found = [newest_resume_checkpoint(d) for d in output_dir.parent.glob("*/checkpoints")]
    newest = max((p for p in found if p is not None), key=lambda p: p.stat().st_mtime, default=None)
    if newest is not None:
        return str(newest)
    log.warning("ckpt_path=last: no checkpoint under %s; starting from scratch", output_dir.parent)
    return None


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


def _wandb_offline_if_no_key(logger_cfg: DictConfig) -> None:
    # A run must never die because nobody logged in to wandb: log offline into the run dir.
    wb = logger_cfg.get("wandb")
    if wb is not None and not os.environ.get("WANDB_API_KEY") and not Path("~/.netrc").expanduser().exists():
        wb.offline = True


def build_loggers(cfg: DictConfig) -> list[Any]:
    _wandb_offline_if_no_key(cfg.logger)
    return [instantiate(c) for c in cfg.logger.values() if c is not None]


def build_callbacks(cfg: DictConfig) -> list[Any]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def run_lowshot(model: Any, datamodule: Any, cfg: DictConfig, output_dir: Path) -> str | None:
    """Low-shot table of the trained target encoder; None when the data has no labels."""
    try:
        train_ds, test_ds = datamodule.eval_datasets()
    except ValueError as err:  # unlabeled data: nothing to evaluate, not an error
        log.info("skipping low-shot evaluation: %s", err)
        return None
    return lowshot_from_config(
        model, train_ds, test_ds, cfg.lowshot, dataset=cfg.data.name, seed=cfg.seed, output_dir=output_dir
    )


def objective_value(lowshot: dict[str, Any], column: str) -> float:
    """The number a hyper-parameter sweeper optimises: mean accuracy of the first MSN row of
    ``lowshot.json`` in ``column`` (``"1"`` for k=1, ``"10%"``, a subset file's stem ...)."""
    row = next((name for name in lowshot if name.startswith(MSN_ROW)), None)
    if row is None:
        raise ConfigError([f"optimized_metric={column!r}: the low-shot table has no MSN row"])
    if column not in lowshot[row]:
        raise ConfigError(
            [f"optimized_metric={column!r} is not a low-shot column; this run has: {', '.join(lowshot[row])}"]
        )
    return float(lowshot[row][column]["mean"])


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate, build, fit and evaluate. Returns paths and metrics of the run."""
    validate_config(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    if cfg.get("init_from"):
        # Weights only, any format msn.interop reads (ours, official .pth.tar, HF, timm); the
        # schedules start afresh from them.
        try:
            loaded = init_msn_module(model, cfg.init_from)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError([f"init_from={cfg.init_from!r}: {err}"]) from err
        log.info("init_from %s: %s", cfg.init_from, ", ".join(f"{k} <- {v}" for k, v in loaded.items()))
    trainer = instantiate(cfg.trainer, logger=build_loggers(cfg) or False, callbacks=build_callbacks(cfg))
    log.info("output dir: %s", output_dir)
    # MSNDataModule checkpoints its position in the epoch (state_dict), which Lightning cannot see.
    warnings.filterwarnings(
        "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
    )

    start = time.perf_counter()
    ckpt_path = resolve_ckpt_path(requested_ckpt_path(cfg.ckpt_path), output_dir)
    stopped_by_lightning = False
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        # Lightning's own stop, for a SIGTERM before PreemptionHandler took over (or without it).
        stopped_by_lightning = True
    finally:
        summary = bad_image_summary(getattr(datamodule, "bad_image_log", None))
        if summary and trainer.is_global_zero:
            print(summary, flush=True)
    fit_seconds = time.perf_counter() - start
    result: dict[str, Any] = {"output_dir": str(output_dir), "fit_seconds": fit_seconds}
    resume_cb = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ResumeCheckpoint)), None)
    if resume_cb is not None and resume_cb.last_model_path:
        result["last_checkpoint"] = resume_cb.last_model_path

    preemption = next((cb for cb in trainer.callbacks if isinstance(cb, PreemptionHandler)), None)
    if preemption is not None and preemption.preempted_by is not None:
        result["preempted_by"] = preemption.preempted_by
        if trainer.is_global_zero:
            requeued = "; the SLURM job was requeued" if preemption.requeued else ""
            print(
                f"preempted by {preemption.preempted_by}: checkpoint of step {preemption.saved_step} "
                f"saved to {result.get('last_checkpoint')}{requeued}; resume with ckpt_path=last",
                flush=True,
            )
        return result
    if stopped_by_lightning:
        result["preempted_by"] = "SIGTERM"
        if trainer.is_global_zero:
            saved = result.get("last_checkpoint") or "no checkpoint yet"
            print(f"stopped by SIGTERM (last checkpoint: {saved}); resume with ckpt_path=last", flush=True)
        return result

    if cfg.lowshot.enabled and trainer.is_global_zero:
        table = run_lowshot(model, datamodule, cfg, output_dir)
        if table is not None:
            print("\n" + table, flush=True)
            result["lowshot_table"] = table
            result["lowshot"] = json.loads((output_dir / "lowshot.json").read_text())
    print(f"pre-training: {fit_seconds:.0f} s; outputs in {output_dir}", flush=True)
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        result = train(cfg)
        metric = cfg.get("optimized_metric")
        if metric is None:
            return None
        # What Hydra's sweepers (e.g. Optuna) optimise; a stopped run or one without labels has no
        # table, which must not pass for a score.
        if "lowshot" not in result:
            raise ConfigError(
                [
                    f"optimized_metric={str(metric)!r} needs the low-shot table "
                    "(lowshot.enabled and labelled data)"
                ]
            )
        value = objective_value(result["lowshot"], str(metric))
        print(f"optimized_metric {metric}: {value:.2f}", flush=True)
        return value
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (TrainingAborted, BadImageError, CheckpointWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    """Console-script entry (``msn-train``); same as ``python train.py``."""
    if not CONFIG_DIR.is_dir():
        sys.exit(f"error: config folder {CONFIG_DIR} not found (install the package with `pip install -e .`)")
    _hydra_main()


__all__ = [
    "main",
    "newest_resume_checkpoint",
    "objective_value",
    "requested_ckpt_path",
    "resolve_ckpt_path",
    "train",
]
