"""The table that ends a ``train.py --multirun`` sweep: each job's overrides and its low-shot row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from msn.eval.reports import MSN_ROW
from msn.eval.splits import shot_label

__all__ = ["SweepSummary", "sweep_table"]


def sweep_table(sweep_dir: Path) -> str | None:
    """Markdown table of the jobs under ``sweep_dir`` (one row per job folder, in job order):
    the job's command-line overrides and the mean accuracy of its MSN row per low-shot column.
    None when the folder holds no job."""
    jobs = sorted(
        (d for d in sweep_dir.iterdir() if (d / ".hydra" / "overrides.yaml").is_file()),
        key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name),
    )
    if not jobs:
        return None
    rows, columns = [], []
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        table = job / "lowshot.json"
        scores = json.loads(table.read_text()).get(MSN_ROW, {}) if table.is_file() else {}
        columns += [c for c in scores if c not in columns]
        rows.append((job.name, " ".join(overrides), scores))
    header = ["job", "overrides", *(shot_label(int(c)) if c.isdigit() else c for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, overrides, scores in rows:
        cells = [f"{scores[c]['mean']:.1f}" if c in scores else "-" for c in columns]
        lines.append("| " + " | ".join([name, overrides or "(none)", *cells]) + " |")
    return "\n".join(lines)


class SweepSummary(Callback):
    """Prints :func:`sweep_table` when a multirun ends (a job without a table shows ``-``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = sweep_table(sweep_dir) if sweep_dir.is_dir() else None
        if table is not None:
            print(f"\nSweep of {sweep_dir} ({MSN_ROW}, low-shot accuracy %):\n{table}", flush=True)
