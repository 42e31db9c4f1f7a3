"""What reaches the console: Lightning's tips and warnings that tell a user of our commands
nothing, and a training progress bar that counts what the run counts."""

from __future__ import annotations

import logging
import warnings

import lightning as L
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE, RichProgressBar

__all__ = ["TrainingProgressBar", "progress_bar", "quiet_lightning"]

IGNORED_WARNINGS = (
    # Lightning's own code on this torch.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Resuming: msn.data.MSNDataModule restores its place in the epoch itself.
    r"You're resuming from a checkpoint that ended before the epoch ended",
    # Resuming into a new run dir: ResumeCheckpoint's state is keyed by its folder, and it needs none.
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
    r"The dirpath has changed from",
    # data=litdata: LitData splits the stream between the workers, so its length is right.
    r"Your `IterableDataset` has `__len__` defined",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


class _DropLitDataChatter(logging.Filter):
    # What LitData says each time a dataset opens (one per split, worker and epoch): how it reads
    # and what it caches; its warnings and errors pass.
    def filter(self, record: logging.LogRecord) -> bool:
        unset = record.getMessage().startswith("max_cache_size is unset")
        return record.levelno > logging.INFO and not unset


_DROP_TIPS = _DropTips()
_DROP_LITDATA_CHATTER = _DropLitDataChatter()


def quiet_lightning() -> None:
    """Silence :data:`IGNORED_WARNINGS` and Lightning's advertising tips (idempotent)."""
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DROP_TIPS)
    for name in ("litdata.streaming.dataset", "litdata.utilities.format"):
        logging.getLogger(name).addFilter(_DROP_LITDATA_CHATTER)


class TrainingProgressBar(RichProgressBar):
    """Lightning's rich bar, labelled ``Epoch e/E`` counted from 1, or, when ``max_steps`` ends the
    run first, ``Epoch e, step limit S`` (Lightning shows ``Epoch 0/99`` either way)."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        epochs, steps = trainer.max_epochs, trainer.max_steps
        per_epoch = trainer.num_training_batches / max(1, trainer.accumulate_grad_batches)
        if steps is not None and steps > 0 and (epochs is None or epochs < 0 or steps < epochs * per_epoch):
            return f"Epoch {current_epoch + 1}, step limit {steps}"
        return f"Epoch {current_epoch + 1}" + (f"/{epochs}" if epochs is not None and epochs > 0 else "")


def progress_bar() -> L.Callback | None:
    """The bar for ``train.py``, or None (Lightning's default) when ``rich`` is not installed."""
    return TrainingProgressBar() if _RICH_AVAILABLE else None
