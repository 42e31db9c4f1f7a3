"""Evaluation reports shared by ``train.py`` (end of pre-training) and ``finetune.py``."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from msn.eval.features import FeatureCache, frozen_features, raw_pixel_features, untrained_copy
from msn.eval.knn import knn_accuracy
from msn.eval.lowshot import format_table, lowshot_eval_splits
from msn.eval.splits import (
    SUBSET_KEY,
    check_percent,
    dataset_targets,
    lowshot_splits,
    percent_label,
    shot_label,
    subset_file_indices,
)

#: ``{column: (mean, std)}``: columns are ``"k=1"``, ``"1%"``, a subset file stem, ... (ints
#: ``k`` are accepted too).
Results = dict[Any, tuple[float, float]]

#: Rows of the low-shot table (and keys of ``lowshot.json``): an MSN checkpoint's features, those
#: of a fine-tuned checkpoint (its encoder has seen labels), and the two baselines.
MSN_ROW = "MSN target encoder"
FINETUNED_ROW = "fine-tuned encoder"
RANDOM_INIT_ROW = "random init"
RAW_PIXELS_ROW = "raw pixels"
_SHOT_COLUMN = re.compile(r"k=(\d+)")


def knn_report(
    model: Any,
    train_ds: Dataset,
    test_ds: Dataset,
    cfg: Any,
    *,
    dataset: str,
    output_dir: Path,
    cache: FeatureCache | None = None,
) -> str:
    """Weighted kNN accuracy of ``model.features`` (``eval/knn`` config); writes ``knn.json``."""
    train_x, train_y, test_x, test_y = frozen_features(model, train_ds, test_ds, cfg.batch_size, cache=cache)
    acc = knn_accuracy(train_x, train_y, test_x, test_y, cfg.k, cfg.temperature)
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {"accuracy": acc, "k": cfg.k, "temperature": cfg.temperature, "train": len(train_y)}
    (output_dir / "knn.json").write_text(json.dumps(payload, indent=2))
    return (
        f"kNN accuracy, {dataset}: {acc:.1f} % (k={cfg.k}, temperature {cfg.temperature}, "
        f"{len(train_y)} labelled train images, {len(test_y)} test images)"
    )


def linear_report(
    model: Any,
    train_ds: Dataset,
    test_ds: Dataset,
    cfg: Any,
    *,
    dataset: str,
    seed: int,
    device: torch.device,
    output_dir: Path,
    cache: FeatureCache | None = None,
) -> str:
    """Linear probe on frozen features (``eval/linear`` config); writes ``linear.json``."""
    from msn.eval.linear_probe import run_linear_probe

    feats = frozen_features(model, train_ds, test_ds, cfg.batch_size, cache=cache)
    res = run_linear_probe(
        *feats,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        base_lr=cfg.base_lr,
        base_batch=cfg.base_batch,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        seed=seed,
        accelerator=device.type,
        output_dir=output_dir,
    )
    return (
        f"Linear-probe accuracy, {dataset}: {res['accuracy']:.1f} % (train {res['train_accuracy']:.1f} %, "
        f"{cfg.epochs} epochs, lr {res['lr']:g} at batch {cfg.batch_size}, "
        f"{res['train']} train / {res['test']} test images)"
    )


def _lambdas(lambd: float | Sequence[float]) -> list[float]:
    """``lowshot.lambd`` as a non-empty list of floats (a single number or a list)."""
    values = [lambd] if isinstance(lambd, (int, float)) else list(lambd)
    if not values:
        raise ValueError("lowshot.lambd must be a number or a non-empty list of numbers")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
            raise ValueError(f"lowshot.lambd values must be finite numbers > 0, got {v!r}")
    return [float(v) for v in values]


def _json_key(column: str) -> str:
    """Key of a column in ``lowshot.json``: a k-shot column by its number (``"k=5" -> "5"``)."""
    m = _SHOT_COLUMN.fullmatch(column)
    return m.group(1) if m else column


def lowshot_json_keys(
    shots: Sequence[int], percents: Sequence[float] = (), subset_files: Sequence[str | Path] = ()
) -> list[str]:
    """Keys of the columns of ``lowshot.json`` that a low-shot config produces (``"1"``,
    ``"10%"``, a subset file's stem; the table sorts the shots): what ``optimized_metric`` may name."""
    columns = [shot_label(k) for k in shots] + [percent_label(p) for p in percents]
    return [_json_key(c) for c in columns] + [Path(str(f)).stem for f in subset_files]


def lowshot_report(
    model: Any,
    train_ds: Dataset,
    test_ds: Dataset,
    *,
    shots: Sequence[int],
    seeds: Sequence[int],
    lambd: float | Sequence[float],
    batch_size: int,
    title: str,
    output_dir: Path,
    baseline_model: Any | None = None,
    raw_pixels: bool = True,
    cache: FeatureCache | None = None,
    percents: Sequence[float] = (),
    subset_files: Sequence[str | Path] = (),
    name: str = MSN_ROW,
) -> str:
    """Low-shot table of ``model.features`` (plus optional random-init and raw-pixel rows).

    Columns: ``k=1``, ``k=2``, ... (``shots``, increasing), then ``1%``, ``10%``, ...
    (``percents``: that share of every class from the same seeded permutations, so the subsets
    are nested with the k-shot ones), then one column per official subset file (named by its
    stem; a single split, std 0). The features' row is called ``name``; with several ``lambd``
    values it becomes one row per value (``MSN target encoder (λ=0.0025)``); the baselines use
    the first value.

    Writes ``lowshot.json`` (``{row: {column: {"mean", "std", "lambd"}}}``, k-shot columns keyed
    ``"1"``, ``"2"``, ...) and ``lowshot.png`` (k-shot columns only) into ``output_dir``; returns
    the printable table.
    """
    # Everything that can be checked without features fails here, before any slow extraction.
    lambdas = _lambdas(lambd)
    if len(seeds) == 0:
        raise ValueError("lowshot.seeds must be non-empty")
    for p in percents:
        check_percent(p)
    files = subset_file_indices(train_ds, subset_files)
    shots = sorted(int(k) for k in shots)
    if not shots and not percents and not files:
        raise ValueError("nothing to evaluate: lowshot.shots, percents and subset_files are all empty")

    # Splits from the labels alone, so that only the images they draw (the k-shot pool) are
    # encoded, not the whole train split.
    splits = lowshot_splits(dataset_targets(train_ds), shots, percents, seeds)
    for stem, idx in files.items():
        if stem in splits or any(_json_key(c) == stem for c in splits):
            raise ValueError(f"{SUBSET_KEY}: file name {stem!r} clashes with another column")
        splits[stem] = [idx]
    pool = np.unique(np.concatenate([idx for column in splits.values() for idx in column]))
    pool_ds = train_ds if len(pool) == len(train_ds) else Subset(train_ds, pool.tolist())
    local = {column: [np.searchsorted(pool, idx) for idx in draws] for column, draws in splits.items()}
    pool_key = hashlib.sha256(pool.astype(np.int64).tobytes()).hexdigest()[:16]

    def features(m: Any, label: str) -> tuple[np.ndarray, ...]:
        return frozen_features(m, pool_ds, test_ds, batch_size, label, cache, f"{label} pool {pool_key}")

    def run(feats: tuple[np.ndarray, ...], lams: list[float]) -> dict[float, Results]:
        train_x, train_y, test_x, test_y = feats
        return lowshot_eval_splits(train_x, train_y, test_x, test_y, local, lams)

    results: dict[str, Results] = {}
    lambd_of: dict[str, float] = {}

    def add(name: str, res: Results, lam: float) -> None:
        results[name] = res
        lambd_of[name] = lam

    msn = run(features(model, "features"), lambdas)
    for lam, res in msn.items():
        add(name if len(lambdas) == 1 else f"{name} (λ={lam:g})", res, lam)
    base = lambdas[:1]
    if baseline_model is not None:
        add(RANDOM_INIT_ROW, run(features(baseline_model, "random-init features"), base)[base[0]], base[0])
    if raw_pixels:
        rx, ry = raw_pixel_features(pool_ds)
        tx, ty = raw_pixel_features(test_ds)
        add(RAW_PIXELS_ROW, run((rx, ry, tx, ty), base)[base[0]], base[0])
    payload = {
        name: {_json_key(c): {"mean": m, "std": s, "lambd": lambd_of[name]} for c, (m, s) in res.items()}
        for name, res in results.items()
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "lowshot.json").write_text(json.dumps(payload, indent=2))
    plot_lowshot(results, output_dir / "lowshot.png", title=title.split(":")[0])
    return format_table(results, title=title)


def lowshot_from_config(
    model: Any,
    train_ds: Dataset,
    test_ds: Dataset,
    cfg: Any,
    *,
    dataset: str,
    seed: int,
    output_dir: Path,
    cache: FeatureCache | None = None,
    name: str = MSN_ROW,
) -> str:
    """:func:`lowshot_report` driven by an ``eval/lowshot`` config node; ``name``: the features' row.

    Keys: ``shots``, ``seeds``, ``lambd`` (number or list), ``batch_size``, ``random_init``,
    ``raw_pixels`` and the optional ``percents`` and ``subset_files`` (default empty).
    """
    percents = list(getattr(cfg, "percents", None) or [])
    subset_files = [str(f) for f in (getattr(cfg, "subset_files", None) or [])]
    title = (
        f"Low-shot accuracy (%), {dataset}: logistic regression on k labelled images per class, "
        f"mean ± std over {len(cfg.seeds)} splits, {len(test_ds)} test images"
    )
    if percents:
        title += "; p% columns: that share of every class"
    if subset_files:
        title += "; subset-file columns: one official split each (std 0)"
    return lowshot_report(
        model,
        train_ds,
        test_ds,
        shots=list(cfg.shots or []),
        seeds=list(cfg.seeds),
        lambd=cfg.lambd if isinstance(cfg.lambd, (int, float)) else list(cfg.lambd),
        batch_size=cfg.batch_size,
        title=title,
        output_dir=output_dir,
        baseline_model=untrained_copy(model, seed) if cfg.random_init else None,
        raw_pixels=cfg.raw_pixels,
        cache=cache,
        percents=percents,
        subset_files=subset_files,
        name=name,
    )


def plot_lowshot(results: dict[str, Results], path: Path, title: str = "") -> Path:
    """PNG of accuracy vs labelled images per class, one line (mean ± std band) per feature set."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    def shot_points(res: Results) -> dict[int, tuple[float, float]]:
        # k-shot columns ("k=5" or the int 5) only: percent and subset-file columns have no
        # place on an images-per-class axis.
        out = {}
        for key, value in res.items():
            m = _SHOT_COLUMN.fullmatch(key) if isinstance(key, str) else None
            if m or not isinstance(key, str):
                out[int(m.group(1)) if m else int(key)] = value
        return out

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    all_ks: set[int] = set()
    for name, res in results.items():
        points = shot_points(res)
        if not points:
            continue
        ks = sorted(points)
        all_ks.update(ks)
        mean = np.array([points[k][0] for k in ks])
        std = np.array([points[k][1] for k in ks])
        ax.plot(ks, mean, marker="o", label=name)
        ax.fill_between(ks, mean - std, mean + std, alpha=0.2)
    if all_ks:
        ax.set_xscale("log")
        ax.set_xticks(sorted(all_ks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if all_ks:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
