"""What every evaluation shares: the run it evaluates (:class:`EvalRun`), the base class of the
evaluations that configs/eval/*.yaml build (:class:`Evaluation`), and the low-shot one, whose table
``train.py`` prints at the end of pre-training and ``finetune.py mode=lowshot`` on any checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import numbers
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset

from msn.checks import ConfigError
from msn.eval.features import (
    FeatureCache,
    file_fingerprint,
    frozen_features,
    raw_pixel_features,
    untrained_copy,
)
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
from msn.io.formats import Checkpoint
from msn.io.load import msn_module

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
# Data keys that change how images are loaded, not which features come out: not in the cache key.
_LOADER_KEYS = ("batch_size", "num_workers", "pin_memory", "persistent_workers", "transform")


@dataclass
class EvalRun:
    """What an evaluation runs on: the labelled splits, where its files go, and the model.

    Args:
        train_ds, test_ds: the labelled evaluation splits (the data module's ``eval_datasets()``).
        dataset: the data set's name, for the printed tables.
        output_dir: where the evaluation writes its files.
        seed: seeds the random-init baseline, the linear probe and fine-tuning.
        device: where a model built from ``checkpoint`` and the trainers run.
        checkpoint: the checkpoint evaluated (``finetune.py``); None for a model in memory.
        datamodule: the data module of the splits (fine-tuning builds its training set from it).
        strict: fail on missing or unexpected encoder weights when building the model.
        features: feature kind of the model (:data:`msn.backbone.FEATURE_KINDS`); None: its own.
        cache_dir: the feature cache folder; None: no cache.
        data: the data config, part of the cache key.
        preloaded: a model already in memory (``train.py``'s); else :attr:`model` is built from
            ``checkpoint`` on first use.
    """

    train_ds: Dataset
    test_ds: Dataset
    dataset: str
    output_dir: Path
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    checkpoint: Checkpoint | None = None
    datamodule: Any = None
    strict: bool = True
    features: str | None = None
    cache_dir: str | Path | None = None
    data: DictConfig | None = None
    preloaded: Any = None

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)

    @cached_property
    def model(self) -> Any:
        """The MSN model whose ``features`` are evaluated (built once, when first asked for:
        fine-tuning never needs it)."""
        if self.preloaded is not None:
            model = self.preloaded
        elif self.checkpoint is not None:
            model = msn_module(self.checkpoint, self.device, strict=self.strict)
        else:
            raise ValueError("EvalRun needs a checkpoint or a preloaded model")
        if self.features is not None:
            model.feature_kind = self.features
        return model

    @cached_property
    def cache(self) -> FeatureCache | None:
        """The feature cache of this checkpoint, data and feature kind; None without a cache
        folder or a checkpoint file."""
        if not self.cache_dir or self.checkpoint is None:
            return None
        data = OmegaConf.to_container(self.data, resolve=True) if self.data is not None else {}
        fingerprint = {
            "ckpt": file_fingerprint(self.checkpoint.weights_file),
            "data": {k: v for k, v in data.items() if k not in _LOADER_KEYS},
            "eval_img_size": self.checkpoint.encoder_kwargs["img_size"],
            "features": self.model.feature_kind,
            "seed": self.seed,
            "sizes": [len(self.train_ds), len(self.test_ds)],  # type: ignore[arg-type]
        }
        return FeatureCache(self.cache_dir, fingerprint)


class Evaluation(ABC):
    """An evaluation built from its config (``configs/eval/<name>.yaml``: ``_target_`` and the
    values its constructor takes); calling it on an :class:`EvalRun` runs it.

    Subclasses are dataclasses of the yaml's values; :meth:`problems` holds their rules, and
    building one with a value that breaks a rule raises ``ConfigError`` listing every problem.
    """

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """What is wrong with the values (empty when they can run); nothing here needs data."""
        return []

    def datasets(self, datamodule: Any) -> tuple[Dataset, Dataset]:
        """The ``(train, test)`` splits this evaluation runs on: the labelled evaluation splits
        (ValueError when the data has none)."""
        return datamodule.eval_datasets()

    @abstractmethod
    def __call__(self, run: EvalRun) -> str:
        """Run on ``run``, write the evaluation's files into ``run.output_dir`` and return the
        printable report."""


def evaluation_class(target: Any) -> type[Evaluation] | None:
    """The :class:`Evaluation` subclass a ``_target_`` names, or None (another class, or
    nothing importable)."""
    module, _, name = str(target).rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, Evaluation) else None


def build_evaluation(key: str, node: Any) -> Evaluation:
    """``instantiate(node)``, the evaluation under config key ``key``; a broken rule, a misspelt
    or missing key become one ``ConfigError`` (naming ``key`` when the constructor complains)."""
    try:
        built = instantiate(node, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError([f"{key}: {' '.join(str(cause or err).split())}"]) from err
    if not isinstance(built, Evaluation):
        raise ConfigError([f"{key}: {type(built).__name__} is not an Evaluation (msn.eval.reports)"])
    return built


def evaluation_problems(key: str, node: Any) -> list[str]:
    """The problems :func:`build_evaluation` would raise for ``node`` (empty when it builds)."""
    try:
        build_evaluation(key, node)
    except ConfigError as err:
        return list(err.problems)  # type: ignore[attr-defined]
    return []


def lambd_values(lambd: Any) -> list[float] | None:
    """``lowshot.lambd`` (a number or a list of numbers) as a list of floats; None unless every
    value is a finite number > 0 and there is at least one."""
    if isinstance(lambd, (int, float)):
        values = [lambd]
    elif isinstance(lambd, Sequence) and not isinstance(lambd, str):
        values = list(lambd)
    else:
        return None
    ok = all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0 for v in values
    )
    return [float(v) for v in values] if values and ok else None


def lowshot_problems(
    shots: Sequence[Any],
    seeds: Sequence[Any],
    lambd: Any,
    percents: Sequence[Any] = (),
    subset_files: Sequence[Any] = (),
) -> list[str]:
    """What is wrong with low-shot settings, before any data is read (empty when they can run)."""
    problems = []
    if any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in shots):
        problems.append(f"lowshot.shots={list(shots)} must be a non-empty list of integers >= 1")
    if lambd_values(lambd) is None:
        problems.append(f"lowshot.lambd={lambd} must be a number > 0 or a non-empty list of them")
    if len(seeds) == 0:
        problems.append("lowshot.seeds must be non-empty")
    for p in percents:
        try:
            check_percent(p)
        except ValueError as err:
            problems.append(str(err))
    if not shots and not percents and not subset_files:
        problems.append("nothing to evaluate: lowshot.shots, percents and subset_files are all empty")
    return problems


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
    problems = lowshot_problems(shots, seeds, lambd, percents, subset_files)
    if problems:
        raise ValueError(problems[0])
    lambdas = lambd_values(lambd) or []
    files = subset_file_indices(train_ds, subset_files)
    shots = sorted(int(k) for k in shots)

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


@dataclass
class LowShotEvaluation(Evaluation):
    """The low-shot table (:func:`lowshot_report`) of ``configs/eval/lowshot.yaml``: the run's
    features, and the random-init and raw-pixel baselines beside them.

    Args:
        shots, seeds, lambd, batch_size, percents, subset_files: as :func:`lowshot_report` takes them.
        random_init: also evaluate the same architecture untrained (seeded by the run's seed).
        raw_pixels: and logistic regression on the raw pixels.
        enabled: whether ``train.py`` prints the table at the end of pre-training (``finetune.py
            mode=lowshot`` runs it either way).
    """

    shots: Sequence[int]
    seeds: Sequence[int]
    lambd: float | Sequence[float]
    batch_size: int
    random_init: bool
    raw_pixels: bool
    percents: Sequence[float] = ()
    subset_files: Sequence[str] = ()
    enabled: bool = True

    def __post_init__(self) -> None:
        # null in the yaml is an empty list.
        self.shots = list(self.shots or [])
        self.seeds = list(self.seeds or [])
        self.percents = list(self.percents or [])
        self.subset_files = [str(f) for f in self.subset_files or []]
        super().__post_init__()

    def problems(self) -> list[str]:
        return lowshot_problems(self.shots, self.seeds, self.lambd, self.percents, self.subset_files)

    def json_keys(self) -> list[str]:
        """The keys of the columns of ``lowshot.json`` (:func:`lowshot_json_keys`)."""
        return lowshot_json_keys(self.shots, self.percents, self.subset_files)

    def __call__(self, run: EvalRun) -> str:
        title = (
            f"Low-shot accuracy (%), {run.dataset}: logistic regression on k labelled images per class, "
            f"mean ± std over {len(self.seeds)} splits, {len(run.test_ds)} test images"  # type: ignore[arg-type]
        )
        if self.percents:
            title += "; p% columns: that share of every class"
        if self.subset_files:
            title += "; subset-file columns: one official split each (std 0)"
        # A fine-tuned checkpoint's encoder has seen labels: its row must not read as MSN's.
        finetuned = run.checkpoint is not None and run.checkpoint.format == "finetuned"
        model = run.model
        return lowshot_report(
            model,
            run.train_ds,
            run.test_ds,
            shots=self.shots,
            seeds=self.seeds,
            lambd=self.lambd,
            batch_size=self.batch_size,
            title=title,
            output_dir=run.output_dir,
            baseline_model=untrained_copy(model, run.seed) if self.random_init else None,
            raw_pixels=self.raw_pixels,
            cache=run.cache,
            percents=self.percents,
            subset_files=self.subset_files,
            name=FINETUNED_ROW if finetuned else MSN_ROW,
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
