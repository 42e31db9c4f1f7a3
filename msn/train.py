"""MSN pre-training entry point (``python train.py`` / ``msn-train``), configured by Hydra.

Builds everything from the config with ``hydra.utils.instantiate``, fits, then evaluates the
target encoder with the official low-shot protocol and prints the table.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from msn.config import ConfigError, validate_config
from msn.evaluate import lowshot_from_config

log = logging.getLogger("msn")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """Turn ``ckpt_path=last`` into a file: this run's ``last.ckpt`` if it exists, else the newest
    ``last.ckpt`` among the earlier runs of the same name (sibling run dirs). Anything else is
    returned as given (after checking that the file exists)."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path != "last":
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
        return str(ckpt_path)
    own = output_dir / "checkpoints" / "last.ckpt"
    if own.is_file():
        return str(own)
    candidates = sorted(
        output_dir.parent.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    if candidates:
        return str(candidates[0])
    log.warning("ckpt_path=last: no last.ckpt under %s; starting from scratch", output_dir.parent)
    return None


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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate, build, fit and evaluate. Returns paths and metrics of the run."""
    validate_config(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    if cfg.get("init_from"):
        state = torch.load(cfg.init_from, map_location="cpu", weights_only=False)
        missing, unexpected = model.load_state_dict(state.get("state_dict", state), strict=False)
        log.info("init_from %s: %d missing, %d unexpected keys", cfg.init_from, len(missing), len(unexpected))
    trainer = instantiate(cfg.trainer, logger=build_loggers(cfg) or False, callbacks=build_callbacks(cfg))
    log.info("output dir: %s", output_dir)

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, output_dir))
    fit_seconds = time.perf_counter() - start
    result: dict[str, Any] = {"output_dir": str(output_dir), "fit_seconds": fit_seconds}
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None and ckpt_cb.last_model_path:
        result["last_checkpoint"] = ckpt_cb.last_model_path

    if cfg.lowshot.enabled and trainer.is_global_zero:
        table = run_lowshot(model, datamodule, cfg, output_dir)
        if table is not None:
            print("\n" + table, flush=True)
            result["lowshot_table"] = table
    print(f"pre-training: {fit_seconds:.0f} s; outputs in {output_dir}", flush=True)
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console-script entry (``msn-train``); same as ``python train.py``."""
    if not CONFIG_DIR.is_dir():
        sys.exit(f"error: config folder {CONFIG_DIR} not found (install the package with `pip install -e .`)")
    _hydra_main()


__all__ = ["main", "resolve_ckpt_path", "train"]
