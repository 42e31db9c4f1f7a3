"""Linear probe on frozen features (the official MSN linear-evaluation protocol).

The target encoder is frozen, so its features are extracted once (eval transform, no
augmentation) and only a linear head is trained on the cached tensors: LayerNorm (affine,
trainable) -> L2 normalisation -> Linear, cross-entropy on all training labels, SGD with Nesterov
momentum 0.9 and no weight decay, lr 6.4 at a global batch of 16,384 scaled linearly to the
batch in use, cosine decay to 0 stepped every iteration, 100 epochs. Reported: top-1 accuracy on
the test split.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from msn.checks import is_int, raise_problems
from msn.eval.features import frozen_features
from msn.eval.reports import EvalRun, Evaluation

NO_LABELS = "dataset has no labels; the linear probe needs a labelled dataset"


def scaled_lr(lr: float | None, base_lr: float, batch_size: int, base_batch: int) -> float:
    """The peak learning rate: ``lr``, or with ``lr=None`` the linear scaling of ``base_lr``."""
    return base_lr * batch_size / base_batch if lr is None else lr


def probe_problems(
    epochs: Any, batch_size: Any, lr: Any, base_lr: Any, base_batch: Any, prefix: str = ""
) -> list[str]:
    """What is wrong with the probe's schedule settings; ``prefix`` names their config node."""
    problems = []
    if not (is_int(epochs) and epochs >= 1):
        problems.append(f"{prefix}epochs={epochs} must be >= 1")
    if not (is_int(batch_size) and batch_size >= 1):
        problems.append(f"{prefix}batch_size={batch_size} must be >= 1")
        return problems  # no scaled lr to check
    if lr is None and not (is_int(base_batch) and base_batch >= 1):
        problems.append(f"{prefix}base_batch={base_batch} must be >= 1")
        return problems
    peak = scaled_lr(lr, base_lr, batch_size, base_batch)
    if (
        isinstance(peak, bool)
        or not isinstance(peak, (int, float))
        or not peak > 0
        or not math.isfinite(peak)
    ):
        problems.append(
            f"{prefix}lr={peak} must be > 0 (lr=None scales base_lr={base_lr} by batch_size/base_batch)"
        )
    return problems


class LinearProbe(L.LightningModule):
    """LayerNorm -> L2 normalisation -> Linear classifier, trained with SGD + per-step cosine lr.

    Args:
        in_dim: feature dimension D.
        num_classes: number of output logits.
        lr: peak learning rate (already scaled to the batch size).
        momentum: SGD momentum.
        weight_decay: SGD weight decay (0 in the official protocol).
        nesterov: Nesterov momentum (on in the official protocol).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = True,
    ) -> None:
        super().__init__()
        if in_dim < 1 or num_classes < 1:
            raise ValueError(f"in_dim={in_dim} and num_classes={num_classes} must be >= 1")
        if lr <= 0:
            raise ValueError(f"lr={lr} must be > 0")
        self.save_hyperparameters()
        self.norm = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, num_classes)
        # Small weights and zero bias as in the official classifier: the inputs are unit vectors,
        # so the default fan-in init would start from needlessly large, arbitrary logits.
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of features ``x`` (N, D)."""
        return self.fc(F.normalize(self.norm(x), dim=1))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean() * 100.0
        # batch_size makes Lightning's epoch mean a sample-weighted mean, so the epoch value is the
        # exact accuracy even when the last batch is smaller.
        on_step = stage == "train"
        kw = {"batch_size": len(y), "on_epoch": True, "on_step": on_step}
        self.log(f"{stage}/loss", loss, prog_bar=on_step, **kw)
        self.log(f"{stage}/acc", acc, prog_bar=True, **kw)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.log("schedule/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """Predicted class indices of a batch (its labels, if any, are ignored)."""
        return self(batch[0]).argmax(dim=1)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=hp.lr,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
            nesterov=hp.nesterov,
        )
        # Cosine over every optimisation step of the run (not per epoch), ending at 0.
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=0.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _as_features(x: np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if t.ndim != 2 or len(t) == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (N, D), got shape {tuple(t.shape)}")
    return t


def _as_labels(y: np.ndarray, n: int, name: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the features, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if y.min() < 0:
        raise ValueError(NO_LABELS)
    return torch.as_tensor(y, dtype=torch.long)


def _accuracy(trainer: L.Trainer, model: LinearProbe, loader: DataLoader, labels: torch.Tensor) -> float:
    preds = torch.cat([p.cpu() for p in trainer.predict(model, dataloaders=loader)])
    return float((preds == labels).double().mean() * 100.0)


def run_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float | None = None,
    base_lr: float = 6.4,
    base_batch: int = 16384,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    accelerator: str = "auto",
    progress: bool = True,
    output_dir: Path | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> dict[str, Any]:
    """Train a :class:`LinearProbe` on cached features and report top-1 accuracy (%).

    Args:
        train_x, train_y: training features (N, D) and integer labels (N,), all of them used.
        test_x, test_y: test features (M, D) and labels (M,); validated on every epoch.
        epochs: passes over the training features.
        batch_size: batch of the head's SGD (one device, so it is also the global batch).
        lr: peak learning rate; ``None`` scales ``base_lr`` linearly: ``base_lr * batch_size / base_batch``.
        base_lr, base_batch: the reference point of that scaling (6.4 at 16,384 officially).
        momentum, weight_decay: SGD settings (Nesterov is always on).
        seed: seeds the head's initialisation and the shuffling order.
        accelerator: Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"``, ...); one device.
        progress: show Lightning's progress bar.
        output_dir: when given, ``csv/metrics.csv`` (per-step lr/loss, per-epoch accuracies) and
            ``linear.json`` (the returned dict) are written there.
        callbacks: extra Lightning callbacks for the fit (e.g. to inspect the trained module).

    Returns:
        ``{"accuracy", "train_accuracy", "epochs", "lr", "batch_size", "momentum", "weight_decay",
        "num_classes", "train", "test", "seed"}``: ``accuracy`` and ``train_accuracy`` are the
        top-1 accuracies (%) of the final head on the whole test and train sets; ``lr`` is the
        effective peak learning rate.

    Raises:
        ValueError: unlabelled data (labels < 0), inconsistent shapes, or a bad hyper-parameter.
    """
    tx, vx = _as_features(train_x, "train_x"), _as_features(test_x, "test_x")
    if tx.shape[1] != vx.shape[1]:
        raise ValueError(f"feature dims differ: train_x has {tx.shape[1]}, test_x has {vx.shape[1]}")
    ty, vy = _as_labels(train_y, len(tx), "train_y"), _as_labels(test_y, len(vx), "test_y")
    problems = probe_problems(epochs, batch_size, lr, base_lr, base_batch)
    raise_problems(problems)
    lr = scaled_lr(lr, base_lr, batch_size, base_batch)

    num_classes = int(max(ty.max(), vy.max())) + 1
    # Only the head's init draws from the global RNG; fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LinearProbe(tx.shape[1], num_classes, lr=lr, momentum=momentum, weight_decay=weight_decay)

    # The tensors are already in memory: worker processes would only add start-up cost.
    train_loader = DataLoader(
        TensorDataset(tx, ty),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )

    def ordered(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)

    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = len(train_loader)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,  # a linear head on cached features gains nothing from several devices
        max_epochs=epochs,
        logger=CSVLogger(output_dir, name="csv", version="") if output_dir is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=min(50, steps_per_epoch),
        default_root_dir=output_dir,
        callbacks=list(callbacks),
    )
    with warnings.catch_warnings():
        # In-memory tensors need no loader workers; Lightning's hint says otherwise.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=ordered(vx, vy))
        # Accuracies of the final head on the full sets (the epoch's running train accuracy
        # mixes weights from the whole epoch).
        accuracy = _accuracy(trainer, model, ordered(vx, vy), vy)
        train_accuracy = _accuracy(trainer, model, ordered(tx, ty), ty)

    result = {
        "accuracy": accuracy,
        "train_accuracy": train_accuracy,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "num_classes": num_classes,
        "train": len(ty),
        "test": len(vy),
        "seed": seed,
    }
    if output_dir is not None:
        (output_dir / "linear.json").write_text(json.dumps(result, indent=2))
    return result


@dataclass
class LinearProbeEvaluation(Evaluation):
    """:func:`run_linear_probe` on the run's frozen features (``configs/eval/linear.yaml``);
    writes ``linear.json`` and ``csv/metrics.csv``.

    Args:
        epochs, batch_size, lr, base_lr, base_batch, momentum, weight_decay: as
            :func:`run_linear_probe` takes them (``batch_size`` also batches the extraction).
    """

    epochs: int
    batch_size: int
    lr: float | None
    base_lr: float
    base_batch: int
    momentum: float
    weight_decay: float

    def problems(self) -> list[str]:
        return probe_problems(self.epochs, self.batch_size, self.lr, self.base_lr, self.base_batch, "linear.")

    def __call__(self, run: EvalRun) -> str:
        feats = frozen_features(run.model, run.train_ds, run.test_ds, self.batch_size, cache=run.cache)
        res = run_linear_probe(
            *feats,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            base_lr=self.base_lr,
            base_batch=self.base_batch,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            seed=run.seed,
            accelerator=run.device.type,
            output_dir=run.output_dir,
        )
        return (
            f"Linear-probe accuracy, {run.dataset}: {res['accuracy']:.1f} % "
            f"(train {res['train_accuracy']:.1f} %, {self.epochs} epochs, lr {res['lr']:g} at batch "
            f"{self.batch_size}, {res['train']} train / {res['test']} test images)"
        )
