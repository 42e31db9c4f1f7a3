"""Checkpoints that survive anything: atomic writes, a rotating resume point, random states.

* :class:`AtomicCheckpointIO` (a Lightning ``CheckpointIO`` plugin) writes every checkpoint to a
  temporary file in the same folder, fsyncs it and renames it over the target: a kill or a full
  disk during a save leaves the previous file as it was.
* :class:`ResumeCheckpoint` (a ``ModelCheckpoint``) keeps ``last.ckpt`` current: every N steps,
  at every epoch end, at the end of training and on request (preemption), and keeps the newest
  ``keep_last`` step checkpoints besides it.
* :class:`MetricsCheckpoint` makes the metrics on disk cover every step a checkpoint counts as
  done: every save flushes the loggers and keeps the row of the step that just ended (Lightning
  hands it to the loggers only after the save), and a resumed run writes it where it is missing.
* :class:`RandomStateCheckpoint` stores the global random states (torch CPU and CUDA, numpy,
  Python) in every checkpoint and puts them back when training resumes, so the masking draws of
  a resumed run are the ones the uninterrupted run would have made. (The data stream needs no
  random state, see :mod:`msn.data.resumable`.)
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import uuid
import zipfile
from contextlib import suppress
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from msn.checks import is_int, raise_problems
from msn.training.loggers import ResumableCSVLogger

log = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointWriteError",
    "MetricsCheckpoint",
    "RandomStateCheckpoint",
    "ResumeCheckpoint",
    "atomic_torch_save",
    "checkpoint_is_complete",
    "collect_rng_states",
    "restore_rng_states",
]

#: Key of the random states in a checkpoint dict.
RNG_KEY = "rng_states"
#: Key of :class:`MetricsCheckpoint`'s row in a checkpoint dict.
PENDING_KEY = "msn_pending_metrics"
_TMP_SUFFIX = ".tmp"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the file it would have replaced is unchanged)."""


def _tmp_name(path: Path) -> Path:
    # Hidden, unique per writer, in the target's folder: os.replace is only atomic within one
    # file system, and a leftover from a killed writer is recognisable (see remove_stale_tmp).
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform / file system allows it.
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` such that ``path`` is either its old or its complete new content.

    Raises:
        CheckpointWriteError: the write failed (e.g. disk full); the temporary file is removed and
            ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        # os.open with 0o666 keeps the usual umask-based permissions of the final file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and not isinstance(err, CheckpointWriteError):
            raise CheckpointWriteError(
                err.errno,
                f"could not write checkpoint {path} ({err.strerror or err}); the previous "
                f"{path.name} is unchanged",
            ) from err
        raise
    _fsync_dir(path.parent)


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that killed writers left in ``folder``; returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(f".*{_TMP_SUFFIX}"):
        with suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def checkpoint_is_complete(path: str | os.PathLike) -> bool:
    """Cheap check that ``path`` is a whole ``torch.save`` file (a zip archive whose central
    directory, written last, is present): a truncated copy fails it without being loaded."""
    try:
        return os.path.getsize(path) > 0 and zipfile.is_zipfile(path)
    except OSError:
        return False


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic, durable local writes (see :func:`atomic_torch_save`).

    Lightning's default writes through a temporary file in the system temp folder and moves it:
    across file systems that move is a plain copy, and nothing is fsynced. Remote paths
    (``s3://`` ...) keep Lightning's behaviour.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


def collect_rng_states() -> dict[str, Any]:
    """Global random states: torch CPU, the current CUDA device, numpy and Python ``random``.

    Plain tensors, lists and tuples only, so the checkpoint loads with ``weights_only=True``.
    Only the current CUDA device is stored: every rank of a multi-GPU run uses its own device and
    draws the same numbers as rank 0 (same seed, same calls), whose states are the ones saved.
    """
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states` (a CUDA state is ignored on a machine without CUDA)."""
    torch.set_rng_state(states["torch"])
    kind, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class MetricsCheckpoint(L.Callback):
    """Every step a checkpoint counts as done has its metrics row on disk, for every logger.

    A save at the end of step ``s`` happens before Lightning logs that step's row, and loggers
    buffer rows: a kill right after the save would lose them, and the resumed run starts at
    ``s + 1``. So every save flushes the loggers and stores the pending row of ``s`` (when it is
    one Lightning logs); at a resume, :class:`~msn.training.loggers.ResumableCSVLogger` keeps the rows
    before the resume step and the stored row is written unless the CSV file has it already
    (without a CSV logger it is written, at worst a second point at that step).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            logger.save()
        connector = trainer._logger_connector
        if not trainer.training or connector._first_loop_iter is None:  # between batches: all logged
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if not connector.should_update_logs or trainer.fit_loop._should_accumulate():
            return
        metrics = {k: float(v) for k, v in connector.metrics["log"].items()}
        checkpoint[PENDING_KEY] = {"step": step, "metrics": {"epoch": trainer.current_epoch, **metrics}}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get(PENDING_KEY)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        covered: set[int] | None = None
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                covered = logger.keep_before(trainer.global_step)
        pending, self._pending = self._pending, None
        if pending is not None and (covered is None or pending["step"] not in covered):
            for logger in trainer.loggers:
                logger.log_metrics(pending["metrics"], step=pending["step"])


class RandomStateCheckpoint(L.Callback):
    """Saves the global random states in every checkpoint and restores them on resume.

    They are put back at ``on_train_start``: after the model was built (which draws random
    numbers) and before the first batch, whose masking (with ``model.mask_seed=null``) then draws
    exactly what the uninterrupted run drew after the checkpointed step. (The data stream and the
    ``augment_on=device`` views are seeded per sample and per batch; they need no saved state.)
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RNG_KEY] = collect_rng_states()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get(RNG_KEY)
        if self._pending is None:
            rank_zero_warn(
                "the checkpoint holds no random states (written by an older version): training resumes, "
                "but its random masking differs from the interrupted run's"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None


class ResumeCheckpoint(ModelCheckpoint):
    """The resume point: ``last.ckpt`` plus the newest ``keep_last`` ``stepNNNNNNNN.ckpt`` files.

    Saved every ``every_n_train_steps`` optimizer steps, after the last batch of every epoch, at
    the end of training and whenever :meth:`save_now` is called (preemption); never twice for one step and
    never after an exception (the last good checkpoint stays as it was). Older step files are
    deleted by Lightning's top-k rotation (monitor ``step``, highest kept).

    Args:
        dirpath: folder of the checkpoints.
        every_n_train_steps: steps between two saves (>= 1).
        keep_last: step checkpoints kept besides ``last.ckpt`` (0: only ``last.ckpt``).
        save_last: ``True`` (``last.ckpt`` is a file of its own) or ``"link"`` (a symbolic link to
            the newest step file: half the writing, for very large models; needs ``keep_last >= 1``).
        filename: name pattern of the step files.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        every_n_train_steps: int = 1000,
        keep_last: int = 2,
        save_last: bool | str = True,
        filename: str = "step{step:08d}",
    ) -> None:
        problems = ResumeCheckpoint.problems(
            every_n_train_steps=every_n_train_steps, keep_last=keep_last, save_last=save_last
        )
        raise_problems(problems, prefix="ResumeCheckpoint ")
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            auto_insert_metric_name=False,
            monitor="step" if keep_last else None,
            mode="max",
            save_top_k=keep_last,
            save_last=save_last,
            every_n_train_steps=every_n_train_steps,
            # A resumed run that reaches a step the killed run had saved overwrites that file
            # instead of adding a "-v1" copy next to it.
            enable_version_counter=False,
        )
        self.keep_last = keep_last

    @staticmethod
    def problems(**kwargs: Any) -> list[str]:
        """Every problem of these constructor arguments (the missing ones take their defaults), named
        as its config keys."""
        given = inspect.signature(ResumeCheckpoint).bind_partial(**kwargs)
        given.apply_defaults()
        a = given.arguments
        problems = []
        for name, minimum in (("every_n_train_steps", 1), ("keep_last", 0)):
            if not (is_int(a[name]) and a[name] >= minimum):
                problems.append(f"{name}={a[name]} must be an integer >= {minimum}")
        if a["save_last"] not in (True, "link"):
            problems.append(f"save_last={a['save_last']!r} must be true or 'link'")
        elif a["save_last"] == "link" and a["keep_last"] == 0:
            problems.append("save_last='link' needs keep_last >= 1 (a step file to link to)")
        return problems

    @property
    def state_key(self) -> str:
        # Stable across changes of the interval or of keep_last between a run and its resume.
        return self._generate_state_key(dirpath=self.dirpath)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath is not None and os.path.isdir(self.dirpath):
            for tmp in remove_stale_tmp(self.dirpath):
                log.info("removed %s, left by a save that was interrupted", tmp)

    def save_now(self, trainer: L.Trainer) -> None:
        """Save the step file and ``last.ckpt`` now, unless this step is saved already."""
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # The epoch-end save happens here, after the last batch of the epoch, not in
        # on_train_epoch_end: Lightning resumes a step-limited run (max_steps set) from an
        # on_train_epoch_end checkpoint inside the finished epoch, so the epoch boundaries of the
        # resumed run shift by one step and its data stream no longer matches. A save at the end
        # of the last batch is a case Lightning restores exactly.
        if batch_idx + 1 >= trainer.num_training_batches:
            self.save_now(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Replaces ModelCheckpoint's epoch-end logic, which would write last.ckpt a second time
        # for a step that was just saved. Only loaders without a length (the batch-end save
        # cannot tell their last batch) are saved here.
        self.save_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The final state, also when the run stops between two periodic saves.
        self.save_now(trainer)
