"""The visual report of a run (``report/`` of a run dir): attention maps, an embedding map,
prototype usage, training curves and the low-shot plot on one static page. ``train.py`` writes it
at the end of pre-training; ``finetune.py mode=report`` writes it for any checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from msn.checks import int_problems
from msn.data.datasets import has_labels
from msn.eval.features import extract_features
from msn.eval.rankme import effective_rank
from msn.eval.reports import EvalRun, Evaluation
from msn.eval.splits import subsample
from msn.report.attention import anchor_keep_mask, cls_attention, plot_attention
from msn.report.curves import plot_curves, read_metrics
from msn.report.embedding import embed_2d, plot_embedding, resolve_method
from msn.report.page import Figure, write_page
from msn.report.prototypes import plot_prototypes, prototype_similarity, prototype_usage

log = logging.getLogger("msn")

#: The report's folder inside the output dir, and the page in it.
REPORT_DIR = "report"
PAGE = "index.html"


def run_dir_of(run: EvalRun) -> Path:
    """The run folder whose records (metrics.csv, lowshot.json, .hydra/config.yaml) the report
    reads: the output dir for a model in memory; for a checkpoint file in ``<run>/checkpoints/``
    that ``<run>``, else the checkpoint's own folder."""
    if run.checkpoint is None:
        return run.output_dir
    source = Path(run.checkpoint.source)
    folder = source.parent if source.is_file() else source
    return folder.parent if folder.name == "checkpoints" else folder


def metrics_file(run_dir: Path) -> Path | None:
    """The CSV logger's ``metrics.csv`` of a run folder, if it has one."""
    candidates = [
        run_dir / "csv" / "metrics.csv",
        run_dir / "metrics.csv",
        *sorted(run_dir.glob("*/metrics.csv")),
    ]
    return next((c for c in candidates if c.is_file()), None)


def log_report_images(loggers: list[Any], report_dir: Path, step: int) -> list[str]:
    """Send the report's PNGs to the TensorBoard and wandb loggers among ``loggers`` (tags
    ``report/<name>``); returns the names of the loggers that got them."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
    from PIL import Image

    pngs = sorted(report_dir.glob("*.png"))
    sent = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            for png in pngs:
                image = np.asarray(Image.open(png).convert("RGB"))
                writer.add_image(f"report/{png.stem}", image, step, dataformats="HWC")
            writer.flush()
            sent.append("tensorboard")
        elif isinstance(logger, WandbLogger):
            for png in pngs:
                logger.log_image(key=f"report/{png.stem}", images=[str(png)], step=step)
            sent.append("wandb")
    return sent


@dataclass
class _Page:
    """What the figures of one report add to its page and to ``report.json``."""

    tag: str
    figures: list[Figure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        log.info("report: %s in %.1f s", name, self.seconds[name])


@dataclass
class ReportEvaluation(Evaluation):
    """The report of ``configs/eval/report.yaml``, written into ``<output dir>/report/``.

    Args:
        attention_images: images of ``attention.png``.
        max_images: at most this many images (a fixed-seed subset) for the embedding map and the
            prototype usage.
        embedding: ``auto`` (UMAP when umap-learn is installed, else t-SNE), ``umap`` or ``tsne``.
        batch_size: images per forward pass.
        enabled: whether ``train.py`` writes the report at the end of pre-training
            (``finetune.py mode=report`` writes it either way).
    """

    attention_images: int = 16
    max_images: int = 5000
    embedding: str = "auto"
    batch_size: int = 256
    enabled: bool = True

    def problems(self) -> list[str]:
        problems = int_problems("report.attention_images", self.attention_images, 1)
        problems += int_problems("report.max_images", self.max_images, 4)
        problems += int_problems("report.batch_size", self.batch_size, 1)
        try:
            resolve_method(self.embedding)
        except ValueError as err:
            problems.append(f"report.{err}")
        return problems

    def datasets(self, datamodule: Any) -> tuple[Dataset, Dataset]:
        # Unlabelled data is fine here: its embedding map is drawn in one colour.
        dataset, _ = datamodule.eval_images()
        return dataset, dataset

    def __call__(self, run: EvalRun) -> str:
        start = time.perf_counter()
        out = run.output_dir / REPORT_DIR
        out.mkdir(parents=True, exist_ok=True)
        model = run.model
        model.eval()
        ckpt = run.checkpoint
        position = _position(model, ckpt)
        where = str(run.output_dir) if ckpt is None else ckpt.source
        page = _Page(tag=f"{where}, {position}" if position else where)
        step = int(model.global_step) if ckpt is None else ckpt.meta.get("global_step")
        page.numbers.update(step=step, labelled=has_labels(run.train_ds))

        with page.timed("attention"):
            self._attention(run, model, out, page)
        with page.timed("features"):
            subset = subsample(run.train_ds, self.max_images, run.seed)
            feats, labels = extract_features(
                model.features, subset, desc="report: features", **self._forward(model)
            )
            page.numbers.update(
                images=len(feats), feature_dim=int(feats.shape[1]), rankme=effective_rank(feats)
            )
        with page.timed("embedding"):
            self._embedding(run, model, feats, labels, out, page)
        with page.timed("prototypes"):
            self._prototypes(run, model, subset, out, page)
        source = run_dir_of(run)
        with page.timed("curves"):
            self._curves(source, out, page)
        lowshot = self._lowshot(source, out, page)

        enc = model.target_encoder
        rank, n = page.numbers["rankme"], min(feats.shape)
        facts = [
            ("run", where),
            ("trained for", position or "not recorded in the checkpoint"),
            (
                "data",
                f"{run.dataset}: {len(run.train_ds):,} images"  # type: ignore[arg-type]
                + ("" if page.numbers["labelled"] else " (unlabelled)"),
            ),
            (
                "encoder",
                f"ViT, {enc.embed_dim} wide, {len(enc.blocks)} blocks, patch {enc.patch_embed.patch_size[0]}",
            ),
            ("effective rank (RankMe)", f"{rank:.1f} of at most {n} (features of {len(feats):,} images)"),
        ]
        write_page(
            out / PAGE,
            title=f"MSN report: {run.dataset}" + (f", {position}" if position else ""),
            facts=facts,
            figures=page.figures,
            skipped=page.skipped,
            lowshot=lowshot,
            lowshot_note=f"no lowshot.json in {source} (train.py writes it; finetune.py mode=lowshot for any "
            "checkpoint)",
            config=_config_text(source, run),
        )
        page.seconds["total"] = round(time.perf_counter() - start, 3)
        record = {**page.numbers, "seconds": page.seconds, "figures": [f.file for f in page.figures]}
        (out / "report.json").write_text(json.dumps({**record, "skipped": page.skipped}, indent=2))
        names = ", ".join(f.file for f in page.figures)
        lines = [f"report: {out / PAGE} ({names}) in {page.seconds['total']:.1f} s"]
        return "\n".join(lines + [f"  not drawn: {s}" for s in page.skipped])

    # ------------------------------------------------------------------ the figures
    def _forward(self, model: Any) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "device": model.device}

    def _attention(self, run: EvalRun, model: Any, out: Path, page: _Page) -> None:
        pick = subsample(run.train_ds, self.attention_images, run.seed)
        images = torch.stack([pick[i][0] for i in range(len(pick))])  # type: ignore[arg-type]
        attention = cls_attention(model.target_encoder, images.to(model.device)).cpu()
        p = model.target_encoder.patch_embed.patch_size[0]
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        keep = anchor_keep_mask(*grid, model.mask_ratio, model.mask_mode, len(images), run.seed)
        default_norm = [0.5] * images.shape[1]
        plot_attention(
            images,
            attention,
            grid,
            keep,
            out / "attention.png",
            mean=getattr(run.datamodule, "mean", default_norm),
            std=getattr(run.datamodule, "std", default_norm),
            mask_ratio=model.mask_ratio,
            title=f"Target encoder, last block: class-token attention over the {grid[0]}x{grid[1]} patches "
            f"({attention.shape[1]} heads)\n{page.tag}",
        )
        page.figures.append(
            Figure(
                "attention.png",
                "Attention maps",
                f"The target encoder's class-token attention in its last block, over the patch grid of the "
                f"evaluation view of {len(images)} images (one row each), averaged over heads and per head, "
                "on one colour scale (a row's weights sum to 1 with the class token's weight on itself). "
                f"First column: the patches an anchor view would drop at mask ratio {model.mask_ratio:g} "
                f"({model.mask_mode}) are tinted blue.",
            )
        )

    def _embedding(
        self, run: EvalRun, model: Any, feats: np.ndarray, labels: np.ndarray, out: Path, page: _Page
    ) -> None:
        labelled = page.numbers["labelled"]
        points, how = embed_2d(feats, self.embedding, run.seed)
        plot_embedding(
            points,
            labels if labelled else None,
            out / "embedding.png",
            title=f"Frozen features ({model.feature_kind}) of {len(feats):,} images: {how}\n{page.tag}",
            classes=getattr(run.train_ds, "classes", None),
        )
        coloured = ", coloured by label." if labelled else "; the data has no labels."
        page.figures.append(
            Figure(
                "embedding.png",
                "Embedding map",
                f"{how} of the frozen target-encoder features ({model.feature_kind}) of {len(feats):,} "
                f"images{coloured} Effective rank (RankMe) of these features: "
                f"{page.numbers['rankme']:.1f} of at most {min(feats.shape)}.",
            )
        )

    def _prototypes(self, run: EvalRun, model: Any, subset: Dataset, out: Path, page: _Page) -> None:
        ckpt = run.checkpoint
        if ckpt is not None and ckpt.prototypes is None:
            page.skipped.append(f"prototypes.png: the checkpoint ({ckpt.format}) holds no prototypes")
            return
        assigned, _ = extract_features(
            lambda x: model.prototype_probs(x).argmax(dim=1, keepdim=True),
            subset,
            desc="report: prototypes",
            **self._forward(model),
        )
        counts = prototype_usage(assigned[:, 0], int(model.prototypes.shape[0]))
        used, k, n = int((counts > 0).sum()), len(counts), len(assigned)
        page.numbers.update(prototypes_used=used, num_prototypes=k)
        plot_prototypes(
            counts,
            prototype_similarity(model.prototypes),
            out / "prototypes.png",
            title=f"Prototypes: {used} of {k} are the target's argmax for some of {n:,} images\n{page.tag}",
        )
        page.figures.append(
            Figure(
                "prototypes.png",
                "Prototypes",
                f"Left: how many of {n:,} images (eval mode) have each prototype as the target network's "
                f"most likely one, sorted; {used} of {k} are used. Middle: pairwise cosine similarity of the "
                "prototypes in that order. Right: histogram of the off-diagonal similarities.",
            )
        )

    @staticmethod
    def _curves(source: Path, out: Path, page: _Page) -> None:
        path = metrics_file(source)
        if path is None:
            page.skipped.append(
                f"curves.png: no metrics.csv in {source} (logger=csv or logger=many writes it)"
            )
            return
        try:
            plot_curves(read_metrics(path), out / "curves.png", title=f"Training curves of {page.tag}")
        except ValueError as err:
            page.skipped.append(f"curves.png: {err} ({path})")
            return
        page.figures.append(
            Figure(
                "curves.png",
                "Training curves",
                f"From {path}: loss parts, prototype use, target confidence, the schedules, throughput and, "
                "when online evaluation ran, its accuracy and effective rank, against the optimizer step.",
            )
        )

    @staticmethod
    def _lowshot(source: Path, out: Path, page: _Page) -> dict[str, Any] | None:
        """The run's ``lowshot.json`` (its plot copied next to the page), if it has one."""
        if not (source / "lowshot.json").is_file():
            return None
        if (source / "lowshot.png").is_file():
            shutil.copyfile(source / "lowshot.png", out / "lowshot.png")
            page.figures.append(
                Figure(
                    "lowshot.png",
                    "Low-shot accuracy",
                    "Test accuracy of logistic regression on k labelled images per class (mean ± std over "
                    "the splits), for the features and baselines of the table above.",
                )
            )
        return json.loads((source / "lowshot.json").read_text())


def _position(model: Any, ckpt: Any) -> str | None:
    """How far the model was trained: ``step N`` (a model in memory, our checkpoints), ``epoch N``
    (official checkpoints), None when the checkpoint does not say."""
    if ckpt is None:
        return f"step {int(model.global_step)}"
    if "global_step" in ckpt.meta:
        return f"step {int(ckpt.meta['global_step'])}"
    if "epoch" in ckpt.meta:
        return f"epoch {int(ckpt.meta['epoch'])}"
    return None


def _config_text(source: Path, run: EvalRun) -> str | None:
    """The run's Hydra config, else the hyper-parameters its checkpoint stores."""
    hydra_config = source / ".hydra" / "config.yaml"
    if hydra_config.is_file():
        return hydra_config.read_text()
    if run.checkpoint is not None and run.checkpoint.hparams:
        stored = json.dumps(run.checkpoint.hparams, indent=2, default=str)
        return "model hyper-parameters stored in the checkpoint:\n" + stored
    return None
