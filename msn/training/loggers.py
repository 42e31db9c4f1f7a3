"""A CSV logger whose metrics file survives a resume into the same run dir.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so a run resumed in
its own folder loses the rows of every step before the resume point. Here the old rows are read
first; :meth:`ResumableCSVLogger.keep_before` (called by
:class:`msn.training.checkpointing.MetricsCheckpoint` once the resume step is known) keeps the ones of the
steps the checkpoint counts as done, and the first save writes them back ahead of the new rows.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["ResumableCSVLogger"]


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
