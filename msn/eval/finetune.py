"""Full fine-tuning of a pre-trained encoder (``finetune.py mode=finetune``).

The recipe is MAE's, as the MSN paper fine-tunes, built from timm's parts:
:func:`timm.optim.param_groups_layer_decay` (AdamW groups, layer-wise lr decay, no weight decay on
1-D parameters, position embedding and class token), :class:`timm.scheduler.CosineLRScheduler`
(linear warmup then cosine, stepped every iteration), :func:`timm.data.create_transform`
(RandomResizedCrop, flip, RandAugment, random erasing), :class:`timm.data.Mixup` (mixup/cutmix
with label smoothing) and :class:`timm.loss.SoftTargetCrossEntropy`; drop path in the blocks.

The classifier is timm's ``head`` on the normalised class token, which is exactly what HF
``ViTMSNForImageClassification`` computes, so a fine-tuned checkpoint exports to it
(``python -m msn.io.export format=hf``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from timm.scheduler import CosineLRScheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from msn.backbone import build_vit, embed_tokens, forward_tokens
from msn.eval.reports import EvalRun, Evaluation
from msn.eval.splits import (
    dataset_targets,
    percent_label,
    sample_k_per_class,
    sample_percent_per_class,
    shot_label,
)
from msn.io.formats import Checkpoint
from msn.io.load import load_encoder_state, set_layer_norm_eps


def classify(vit: VisionTransformer, images: Tensor) -> Tensor:
    """Logits (B, C) of ``images`` (B, C_in, H, W): ``head(norm(tokens))[:, 0]`` (class token).

    Same as timm's ``vit(images)`` at the trained size; other sizes resample the position table.
    """
    return vit.forward_head(vit.norm(forward_tokens(vit, embed_tokens(vit, images))))


class FineTuneModule(L.LightningModule):
    """A pre-trained ViT with a linear classifier, fine-tuned end to end.

    Args:
        encoder: :func:`~msn.backbone.build_vit` kwargs of the pre-trained encoder.
        num_classes: classifier outputs C.
        id2label: class names (exported as HF ``id2label``).
        mean, std: input normalisation of the data (kept for export).
        layer_norm_eps: eps of the encoder's LayerNorms (1e-6 unless imported otherwise).
        drop_path_rate: stochastic depth, linear over the blocks up to this value.
        lr: peak learning rate of the classifier (block i gets ``lr * layer_decay^(depth - i)``).
        min_lr, warmup_epochs: the schedule: linear warmup from ``min_lr``, cosine to ``min_lr``.
        weight_decay, layer_decay, betas: AdamW and the layer-wise lr decay.
        label_smoothing, mixup, cutmix, mixup_prob, mixup_switch_prob: targets (timm ``Mixup``).
        head_init_std: std of the classifier's truncated-normal init (MAE: 2e-5).
    """

    def __init__(
        self,
        encoder: Mapping[str, Any],
        num_classes: int,
        id2label: Mapping[int, str] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        layer_norm_eps: float = 1e-6,
        drop_path_rate: float = 0.2,
        lr: float = 1e-3,
        min_lr: float = 1e-6,
        warmup_epochs: float = 5.0,
        weight_decay: float = 0.05,
        layer_decay: float = 0.65,
        betas: Sequence[float] = (0.9, 0.999),
        label_smoothing: float = 0.1,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        head_init_std: float = 2e-5,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"fine-tuning needs at least 2 classes, got {num_classes}")
        if not lr > 0 or not 0 < layer_decay <= 1 or not 0 <= drop_path_rate < 1:
            raise ValueError(
                f"finetune: lr={lr} must be > 0, layer_decay={layer_decay} in (0, 1], "
                f"drop_path={drop_path_rate} in [0, 1)"
            )
        # The encoder's own drop path (0 in pre-training) gives way to the fine-tuning one; the
        # hyper-parameters are read from the locals, so they store the cleaned kwargs.
        encoder = {k: v for k, v in dict(encoder).items() if k != "drop_path_rate"}
        self.save_hyperparameters()
        self.vit = build_vit(**encoder, drop_path_rate=drop_path_rate)
        set_layer_norm_eps(self.vit, layer_norm_eps)
        self.vit.reset_classifier(num_classes)
        nn.init.trunc_normal_(self.vit.head.weight, std=head_init_std)
        nn.init.zeros_(self.vit.head.bias)
        self.mixup_fn = None
        if (mixup > 0 or cutmix > 0) and mixup_prob > 0:
            self.mixup_fn = Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            self.train_criterion: nn.Module = SoftTargetCrossEntropy()
        elif label_smoothing > 0:
            self.train_criterion = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.train_criterion = nn.CrossEntropyLoss()
        self.val_history: list[float] = []
        self._val_counts = [0, 0]

    def forward(self, images: Tensor) -> Tensor:
        """Logits (B, num_classes)."""
        return classify(self.vit, images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)  # soft (B, C) targets
        loss = self.train_criterion(self(images), targets)
        lr = max(g["lr"] for g in self.trainer.optimizers[0].param_groups)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        self.log("schedule/lr", lr, batch_size=len(images))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_counts = [0, 0]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, targets = batch
        logits = self(images)
        self.log("val/loss", F.cross_entropy(logits, targets), batch_size=len(images))
        self._val_counts[0] += int((logits.argmax(dim=1) == targets).sum())
        self._val_counts[1] += len(targets)

    def on_validation_epoch_end(self) -> None:
        correct, total = self._val_counts
        acc = 100.0 * correct / max(total, 1)
        self.log("val/acc", acc, prog_bar=True)
        if not self.trainer.sanity_checking:
            self.val_history.append(acc)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = param_groups_layer_decay(
            self.vit,
            weight_decay=hp.weight_decay,
            no_weight_decay_list=list(self.vit.no_weight_decay()),
            layer_decay=hp.layer_decay,
        )
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = min(total - 1, round(hp.warmup_epochs * per_epoch))
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=max(1, total - warmup),
            lr_min=hp.min_lr,
            warmup_t=warmup,
            warmup_lr_init=hp.min_lr,
            warmup_prefix=True,
            t_in_epochs=False,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: CosineLRScheduler, metric: Any = None) -> None:
        # timm schedulers are driven by the update count (scaled by each group's lr_scale).
        scheduler.step_update(num_updates=self.global_step)


def label_subset(
    labels: np.ndarray, percent: float | None, shots: int | None, seed: int
) -> tuple[np.ndarray, str]:
    """``(indices, name)`` of the labelled training subset: all, ``percent`` % or ``shots`` per class.

    The same nested seeded splits as the low-shot evaluation (:func:`msn.eval.splits.sample_per_class`).
    """
    if percent is not None and shots is not None:
        raise ValueError("finetune.label_percent and finetune.label_shots are exclusive; set one of them")
    if percent is not None:
        return sample_percent_per_class(labels, percent, seed), percent_label(percent)
    if shots is not None:
        return sample_k_per_class(labels, shots, seed), shot_label(shots)
    return np.arange(len(labels)), "100%"


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    # RandAugment's PosterizeIncreasing keeps 0 bits at full magnitude; Pillow < 13 turned that into a
    # black image, Pillow >= 13 raises. Keep the old meaning.
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def train_transform(img_size: int, mean: Sequence[float], std: Sequence[float], cfg: Any) -> Any:
    """timm's training transform of the recipe (``finetune`` config keys)."""
    transform = create_transform(
        img_size,
        is_training=True,
        scale=tuple(cfg.crop_scale),
        hflip=cfg.hflip,
        auto_augment=cfg.rand_augment or None,
        re_prob=cfg.reprob,
        interpolation="bicubic",
        mean=tuple(mean),
        std=tuple(std),
    )
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def run_finetune(
    ckpt: Checkpoint,
    datamodule: Any,
    cfg: FineTuneEvaluation | Any,
    *,
    seed: int,
    accelerator: str,
    output_dir: Path,
    strict: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``ckpt``'s encoder on ``datamodule``'s labelled data with the recipe ``cfg`` (a
    :class:`FineTuneEvaluation`, or anything with its attributes).

    The training images are ``datamodule``'s evaluation train split (or a ``label_percent`` /
    ``label_shots`` subset of it) with the recipe's augmentation; validation is the evaluation
    test split with the evaluation transform, after every epoch. Writes
    ``checkpoints/best.ckpt`` (best validation accuracy), ``checkpoints/last.ckpt``,
    ``csv/metrics.csv`` and ``finetune.json`` into ``output_dir``.

    Returns:
        The ``finetune.json`` payload: ``best_accuracy``, ``best_epoch``, ``last_accuracy``,
        ``val_accuracy`` (per epoch), ``labels``, ``train``, ``test``, ``lr``, checkpoint paths...
    """
    eval_train, test_ds = datamodule.eval_datasets()  # labelled, or a clear ValueError
    labels = dataset_targets(eval_train)
    idx, labels_name = label_subset(labels, cfg.label_percent, cfg.label_shots, cfg.split_seed)
    if len(idx) < cfg.batch_size:
        raise ValueError(
            f"finetune.batch_size={cfg.batch_size} is larger than the {len(idx)} labelled training images "
            f"({labels_name}); lower finetune.batch_size"
        )
    name, state = ckpt.encoder_state(cfg.encoder)
    img_size = int(ckpt.encoder_kwargs["img_size"])
    mean, std = datamodule.mean, datamodule.std
    train_ds = datamodule.labelled_split("eval_train_split", train_transform(img_size, mean, std, cfg))
    classes = list(getattr(eval_train, "classes", None) or range(int(labels.max()) + 1))
    lr = cfg.lr if cfg.lr is not None else cfg.blr * cfg.batch_size / 256

    L.seed_everything(seed, workers=True)
    model = FineTuneModule(
        encoder=ckpt.encoder_kwargs,
        num_classes=len(classes),
        id2label={i: str(c) for i, c in enumerate(classes)},
        mean=list(mean),
        std=list(std),
        layer_norm_eps=ckpt.layer_norm_eps,
        drop_path_rate=cfg.drop_path,
        lr=lr,
        min_lr=cfg.min_lr,
        warmup_epochs=cfg.warmup_epochs,
        weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay,
        betas=list(cfg.betas),
        label_smoothing=cfg.label_smoothing,
        mixup=cfg.mixup,
        cutmix=cfg.cutmix,
        mixup_prob=cfg.mixup_prob,
        mixup_switch_prob=cfg.mixup_switch_prob,
        head_init_std=cfg.head_init_std,
    )
    # The classifier (vit.head) is new; everything else comes from the checkpoint.
    state = {**state, **{f"head.{k}": v for k, v in model.vit.head.state_dict().items()}}
    load_encoder_state(
        model.vit, state, what=f"{name} of {ckpt.source}", strict=strict, unexpected_source=ckpt.unexpected
    )

    train_loader = DataLoader(
        Subset(train_ds, idx.tolist()),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,  # mixup needs even, constant batches
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    val_loader = DataLoader(test_ds, batch_size=max(cfg.batch_size, 256), num_workers=cfg.num_workers)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints", filename="best", monitor="val/acc", mode="max", save_last=True
    )
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=cfg.epochs,
        precision=cfg.precision,
        logger=CSVLogger(output_dir, name="csv", version=""),
        callbacks=[checkpoint],
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=min(50, len(train_loader)),
        default_root_dir=output_dir,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader)

    history = model.val_history
    best = int(np.argmax(history))
    result = {
        "best_accuracy": history[best],
        "best_epoch": best + 1,
        "last_accuracy": history[-1],
        "val_accuracy": history,
        "labels": labels_name,
        "train": len(idx),
        "test": len(test_ds),
        "num_classes": len(classes),
        "epochs": cfg.epochs,
        "lr": lr,
        "batch_size": cfg.batch_size,
        "encoder": name,
        "seed": seed,
        "best_checkpoint": checkpoint.best_model_path,
        "last_checkpoint": checkpoint.last_model_path,
    }
    (output_dir / "finetune.json").write_text(json.dumps(result, indent=2))
    return result


def finetune_summary(result: Mapping[str, Any], dataset: str) -> str:
    """One printable line of a :func:`run_finetune` result."""
    return (
        f"Fine-tuning accuracy, {dataset}: {result['best_accuracy']:.1f} % best "
        f"(epoch {result['best_epoch']} of {result['epochs']}), {result['last_accuracy']:.1f} % last; "
        f"{result['labels']} labels = "
        f"{result['train']} train images, {result['test']} test images; lr {result['lr']:.3g} at batch "
        f"{result['batch_size']}; checkpoints {Path(result['best_checkpoint']).parent}"
    )


@dataclass
class FineTuneEvaluation(Evaluation):
    """Full fine-tuning of the run's checkpoint (:func:`run_finetune`) with the recipe of
    ``configs/eval/finetune.yaml``, whose keys are the fields (documented there)."""

    epochs: int
    batch_size: int
    lr: float | None
    blr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    layer_decay: float
    betas: Sequence[float]
    drop_path: float
    label_smoothing: float
    mixup: float
    cutmix: float
    mixup_prob: float
    mixup_switch_prob: float
    rand_augment: str | None
    reprob: float
    crop_scale: Sequence[float]
    hflip: float
    head_init_std: float
    label_percent: float | None
    label_shots: int | None
    split_seed: int
    encoder: str | None
    num_workers: int
    precision: str
    progress: bool

    def problems(self) -> list[str]:
        problems = []
        if not isinstance(self.epochs, int) or self.epochs < 1:
            problems.append(f"finetune.epochs={self.epochs} must be an integer >= 1")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"finetune.batch_size={self.batch_size} must be an integer >= 1")
        elif (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0 and self.batch_size % 2:
            problems.append(
                f"finetune.batch_size={self.batch_size} must be even with mixup/cutmix (each batch is mixed "
                "with its reverse)"
            )
        if self.lr is not None and not self.lr > 0:
            problems.append(f"finetune.lr={self.lr} must be > 0 (or null: blr * batch_size / 256)")
        if self.label_percent is not None and self.label_shots is not None:
            problems.append("finetune.label_percent and finetune.label_shots are exclusive; set one of them")
        scale = list(self.crop_scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            problems.append(f"finetune.crop_scale={scale} must be [lo, hi] with 0 < lo <= hi <= 1")
        return problems

    def __call__(self, run: EvalRun) -> str:
        if run.checkpoint is None:
            raise ValueError("fine-tuning needs a checkpoint (EvalRun.checkpoint)")
        result = run_finetune(
            run.checkpoint,
            run.datamodule,
            self,
            seed=run.seed,
            accelerator=run.device.type,
            output_dir=run.output_dir,
            strict=run.strict,
        )
        return finetune_summary(result, run.dataset)


__all__ = [
    "FineTuneEvaluation",
    "FineTuneModule",
    "classify",
    "dataset_targets",
    "finetune_summary",
    "label_subset",
    "run_finetune",
    "train_transform",
]
