"""The run's curves (``curves.png``) from its ``metrics.csv`` (Lightning's CSV logger, one row per
logging step, empty cells for the metrics not logged at that step)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from msn.report.figure import pyplot, save

#: The panels: title, y-axis label, the metric columns drawn (those present), log scale.
PANELS: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    ("loss", "nats", ("train/loss", "train/ce"), False),
    ("ME-MAX and target entropy", "nats", ("train/me_max", "train/entropy"), False),
    ("prototypes used per training batch (targets)", "prototypes", ("train/num_prototypes_used",), False),
    ("target max probability", "probability", ("train/max_target_prob",), False),
    ("learning rate", "lr", ("schedule/lr",), True),
    ("weight decay", "wd", ("schedule/wd",), False),
    ("EMA momentum", "momentum", ("schedule/momentum",), False),
    ("sharpening temperature", "temperature", ("schedule/sharpen_temperature",), False),
    ("throughput", "images / s", ("train/images_per_sec",), False),
    ("online accuracy", "accuracy (%)", ("online/knn", "online/lowshot_*"), False),
    ("online: prototypes used by test images", "prototypes", ("online/num_prototypes_used",), False),
    ("online effective rank (RankMe)", "rank", ("online/rankme",), False),
)


#: Series with at least this many points get a moving average over the raw line.
SMOOTH_FROM = 200


def read_metrics(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{column: (steps, values)}`` of every metric column of a Lightning ``metrics.csv``, rows
    without a value left out; a step logged twice (a resumed run) keeps its last value."""
    series: dict[str, dict[int, float]] = {}
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, cell in row.items():
                if key in ("step", "epoch") or not cell:
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    series.setdefault(key, {})[int(float(step))] = value
    return {
        key: (np.array(sorted(points)), np.array([points[s] for s in sorted(points)]))
        for key, points in series.items()
    }


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points (shorter at the ends), same length."""
    if window <= 1:
        return values
    kernel = np.ones(window)
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones_like(values), kernel, mode="same")


def _columns(metrics: dict[str, tuple[np.ndarray, np.ndarray]], pattern: str) -> list[str]:
    if pattern.endswith("*"):
        return sorted(k for k in metrics if k.startswith(pattern[:-1]))
    return [pattern] if pattern in metrics else []


def plot_curves(metrics: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, *, title: str) -> Path:
    """One panel per entry of :data:`PANELS` that has data, against the optimizer step (long,
    noisy series faint, with a moving average over 1/50 of the run on top)."""
    plt = pyplot()

    panels = []
    for name, unit, patterns, log in PANELS:
        columns = [c for p in patterns for c in _columns(metrics, p)]
        if columns:
            panels.append((name, unit, columns, log))
    if not panels:
        raise ValueError("metrics.csv holds none of the metrics a curve is drawn of")
    ncols = 4
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 2.8 * nrows + 0.6), dpi=100, squeeze=False)
    for ax, (name, unit, columns, log) in zip(axes.flat, panels):
        for column in columns:
            steps, values = metrics[column]
            if len(steps) >= SMOOTH_FROM:
                # Per-batch values are noisy: the raw line faint, a moving average on top.
                line = ax.plot(steps, values, lw=0.6, alpha=0.3)[0]
                ax.plot(
                    steps,
                    moving_average(values, len(steps) // 50),
                    lw=1.2,
                    color=line.get_color(),
                    label=column,
                )
            else:
                ax.plot(steps, values, lw=1, marker="o" if len(steps) < 30 else None, ms=3, label=column)
        if log and all(metrics[c][1].min() > 0 for c in columns):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.locator_params(axis="x", nbins=5)  # long runs: step labels must not overlap
        ax.set_xlabel("step")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if len(columns) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return save(fig, path)
