"""Evaluation reports shared by ``train.py`` (end of pre-training) and ``finetune.py``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from msn.feature_cache import FeatureCache
from msn.knn import knn_accuracy
from msn.lowshot import extract_features, format_table, lowshot_eval, raw_pixel_features

Results = dict[int, tuple[float, float]]


def untrained_copy(model: Any, seed: int) -> Any:
    """The same architecture with a fresh random initialisation (the random-init baseline)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return type(model)(**model.hparams).to(model.device)


def frozen_features(
    model: Any,
    train_ds: Dataset,
    test_ds: Dataset,
    batch_size: int,
    label: str = "features",
    cache: FeatureCache | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, test_x, test_y)``: ``model.features`` of both sets, in eval mode.

    With a ``cache``, features are read from it when present and written after extraction.
    """
    names = ("train_x", "train_y", "test_x", "test_y")
    if cache is not None and (hit := cache.load(label)) is not None and set(hit) == set(names):
        return tuple(hit[n] for n in names)  # type: ignore[return-value]
    model.eval()
    kw = {"batch_size": batch_size, "device": model.device}
    train_x, train_y = extract_features(model.features, train_ds, desc=f"{label} (train)", **kw)
    test_x, test_y = extract_features(model.features, test_ds, desc=f"{label} (test)", **kw)
    if cache is not None:
        cache.save(label, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    return train_x, train_y, test_x, test_y


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
    from msn.linear_probe import run_linear_probe

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


def lowshot_report(
    model: Any,
    train_ds: Dataset,
    test_ds: Dataset,
    *,
    shots: Sequence[int],
    seeds: Sequence[int],
    lambd: float,
    batch_size: int,
    title: str,
    output_dir: Path,
    baseline_model: Any | None = None,
    raw_pixels: bool = True,
    cache: FeatureCache | None = None,
) -> str:
    """Low-shot table of ``model.features`` (plus optional random-init and raw-pixel rows).

    Writes ``lowshot.json`` and ``lowshot.png`` into ``output_dir``; returns the printable table.
    """

    def evaluate(net: Any, label: str) -> Results:
        feats = frozen_features(net, train_ds, test_ds, batch_size, label, cache=cache)
        return lowshot_eval(*feats, shots, seeds, lambd)

    results = {"MSN target encoder": evaluate(model, "features")}
    if baseline_model is not None:
        results["random init"] = evaluate(baseline_model, "random-init features")
    if raw_pixels:
        rx, ry = raw_pixel_features(train_ds)
        tx, ty = raw_pixel_features(test_ds)
        results["raw pixels"] = lowshot_eval(rx, ry, tx, ty, shots, seeds, lambd)
    payload = {
        name: {str(k): {"mean": m, "std": s} for k, (m, s) in res.items()} for name, res in results.items()
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
) -> str:
    """:func:`lowshot_report` driven by an ``eval/lowshot`` config node."""
    return lowshot_report(
        model,
        train_ds,
        test_ds,
        shots=list(cfg.shots),
        seeds=list(cfg.seeds),
        lambd=cfg.lambd,
        batch_size=cfg.batch_size,
        title=(
            f"Low-shot accuracy (%), {dataset}: logistic regression on k labelled images per class, "
            f"mean ± std over {len(cfg.seeds)} splits, {len(test_ds)} test images"
        ),
        output_dir=output_dir,
        baseline_model=untrained_copy(model, seed) if cfg.random_init else None,
        raw_pixels=cfg.raw_pixels,
        cache=cache,
    )


def plot_lowshot(results: dict[str, Results], path: Path, title: str = "") -> Path:
    """PNG of accuracy vs labelled images per class, one line (mean ± std band) per feature set."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for name, res in results.items():
        ks = sorted(res)
        mean = np.array([res[k][0] for k in ks])
        std = np.array([res[k][1] for k in ks])
        ax.plot(ks, mean, marker="o", label=name)
        ax.fill_between(ks, mean - std, mean + std, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks(sorted({k for res in results.values() for k in res}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
