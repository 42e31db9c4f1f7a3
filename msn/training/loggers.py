"""Loggers that survive a resume: the CSV file keeps its rows, wandb continues its run.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so a run resumed in
its own folder loses the rows of every step before the resume point. Here the old rows are read
first; :meth:`ResumableCSVLogger.keep_before` (called by
:class:`msn.training.checkpointing.MetricsCheckpoint` once the resume step is known) keeps the ones of the
steps the checkpoint counts as done, and the first save writes them back ahead of the new rows.

A wandb run is continued rather than restarted: :class:`LoggerRecord` writes its run id into every
checkpoint, :func:`recorded_logger_ids` reads it back before the loggers of the resumed run are
built, and :func:`wandb_resume_kwargs` hands it to the ``WandbLogger``.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = [
    "LOGGERS_KEY",
    "LoggerRecord",
    "ResumableCSVLogger",
    "recorded_logger_ids",
    "wandb_resume_kwargs",
]

log = logging.getLogger("msn")

#: Key of :class:`LoggerRecord`'s ids in a checkpoint dict.
LOGGERS_KEY = "msn_loggers"
WANDB_RUN_ID = "wandb_run_id"


class _KeepingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        self.old_rows: list[dict[str, Any]] = []
        self.kept: list[dict[str, Any]] = []
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.old_rows = list(csv.DictReader(f))
            self._fs.rm_file(self.metrics_file_path)  # written again, kept rows first, on the next save

    def save(self) -> None:
        if self.kept:
            self.metrics = [*self.kept, *self.metrics]
            self.kept = []
        super().save()


def _step(row: dict[str, Any]) -> int | None:
    value = row.get("step")
    return None if value in (None, "") else int(float(value))


class ResumableCSVLogger(CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` that keeps the rows before the resume step."""

    def keep_before(self, step: int) -> set[int]:
        """Keep the old rows of steps ``< step``; returns the steps they cover."""
        writer = self.experiment
        writer.kept = [r for r in writer.old_rows if (s := _step(r)) is not None and s < step]
        return {s for r in writer.kept if (s := _step(r)) is not None}

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


class LoggerRecord(L.Callback):
    """Writes ``{"wandb_run_id": ...}`` (when a ``WandbLogger`` logs) into every checkpoint."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Only rank zero's dict is written, and only there does the logger hold a real run.
        if not trainer.is_global_zero:
            return
        wandb = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if wandb is not None:
            checkpoint[LOGGERS_KEY] = {WANDB_RUN_ID: str(wandb.experiment.id)}


def recorded_logger_ids(path: str | os.PathLike) -> dict[str, str]:
    """The ids :class:`LoggerRecord` stored in checkpoint ``path`` (empty when it has none)."""
    try:  # mmap: the tensors of a large checkpoint are not read
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as err:  # not a plain train.py checkpoint
        log.warning("could not read the logger run ids of %s (%s): the loggers start new runs", path, err)
        return {}
    ids = ckpt.get(LOGGERS_KEY) if isinstance(ckpt, dict) else None
    return dict(ids) if isinstance(ids, dict) else {}


def wandb_resume_kwargs(node: Mapping[str, Any], run_id: str | None) -> dict[str, Any]:
    """Extra ``WandbLogger`` arguments that continue run ``run_id`` (the resumed checkpoint's);
    none without an id, or when the config names its own run (``id`` or ``version``)."""
    if not run_id or node.get("id") or node.get("version"):
        return {}
    return {"id": run_id, "resume": "allow"}
