"""Guards of a long pre-training run: preemption, non-finite losses, prototype collapse.

* :class:`PreemptionHandler`: SIGTERM / SIGUSR1 (SLURM's warning before a time limit or a
  preemption) only set a flag; at the end of the current step the resume checkpoint is written,
  a SLURM job with Lightning's ``SLURMEnvironment(auto_requeue=True)`` is requeued, and training
  stops cleanly. (Lightning's own SLURM handler saves from inside the signal handler, i.e. in the
  middle of a step, and not to the run's checkpoint folder.)
* :class:`NonFiniteGuard`: a NaN/Inf loss or gradient stops the run before the optimizer step
  with a message that gives the step and the loss parts; the last good checkpoint is untouched.
  Or, with ``on_nonfinite="skip_step"``, the update of that batch is dropped.
* :class:`CollapseMonitor`: warns loudly (optionally stops) when the targets use fewer than a
  fraction of the prototypes for several logging steps in a row.

Each stop raises a :class:`TrainingAborted` subclass, which ``train.py`` reports as one message.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_warn

from msn.checks import is_int, own_arguments, raise_problems
from msn.eval.online import CollapseRule
from msn.training.checkpointing import ResumeCheckpoint

log = logging.getLogger(__name__)

__all__ = [
    "ON_NONFINITE",
    "CollapseMonitor",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "PreemptionHandler",
    "PrototypeCollapseError",
    "TrainingAborted",
    "requeue_slurm_job",
]

ON_NONFINITE = ("stop", "skip_step")
#: Logged loss parts quoted when a loss turns non-finite.
LOSS_PARTS = ("train/loss", "train/ce", "train/me_max", "train/entropy")


class TrainingAborted(RuntimeError):
    """Training was stopped on purpose by a guard; the message says why and what to do."""


class NonFiniteLossError(TrainingAborted):
    """The loss or the gradients became NaN or infinite."""


class PrototypeCollapseError(TrainingAborted):
    """The targets used too few prototypes for too long (``CollapseMonitor(stop=True)``)."""


def _resume_checkpoint(trainer: L.Trainer) -> ResumeCheckpoint | None:
    return next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ResumeCheckpoint)), None)


def _last_checkpoint_note(trainer: L.Trainer) -> str:
    cb = _resume_checkpoint(trainer)
    if cb is None or not cb.last_model_path:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint {cb.last_model_path} is untouched (resume: ckpt_path=last)"


# ------------------------------------------------------------------------------------------ preemption
def _signal_number(sig: Any) -> signal.Signals | None:
    """The signal named (or numbered) ``sig``; None when there is none."""
    try:
        return signal.Signals[sig] if isinstance(sig, str) else signal.Signals(sig)
    except (KeyError, ValueError, TypeError):
        return None


def _cluster_environment(trainer: L.Trainer) -> Any:
    # Single-device strategies do not expose it; the accelerator connector always holds it.
    env = getattr(trainer.strategy, "cluster_environment", None)
    connector = getattr(trainer, "_accelerator_connector", None)
    return env if env is not None else getattr(connector, "cluster_environment", None)


def requeue_slurm_job(environ: dict[str, str] | None = None) -> bool:
    """``scontrol requeue`` this SLURM job (array jobs: this task); True on success."""
    env = os.environ if environ is None else environ
    array_job = env.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{env['SLURM_ARRAY_TASK_ID']}" if array_job else env.get("SLURM_JOB_ID")
    if not job:
        log.warning("cannot requeue: SLURM_JOB_ID is not set")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("requeueing SLURM job %s failed: %s", job, err)
        return False
    if result.returncode != 0:
        log.warning("requeueing SLURM job %s failed: %s", job, (result.stderr or result.stdout).strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True


def _say(message: str) -> None:
    # os.write, not print or logging: safe inside a signal handler.
    os.write(2, f"\n{message}\n".encode())


class PreemptionHandler(L.Callback):
    """Checkpoint at the end of the current step and stop cleanly on SIGTERM / SIGUSR1 / SIGINT.

    The handlers only record the signal. At the end of the step that is running, every rank
    agrees on it (any rank that got one counts), the :class:`~msn.training.checkpointing.ResumeCheckpoint`
    saves, the job is requeued when SLURM auto-requeue is on (Lightning's ``SLURMEnvironment``,
    on its ``requeue_signal``), and ``trainer.should_stop`` ends training. Afterwards
    ``preempted_by`` names the signal and ``saved_step`` the step of the checkpoint.

    The handlers are installed at ``setup``, before Lightning's: Lightning then adds no SLURM
    handler of its own (it would save from inside the signal handler, in the middle of a step, to
    another folder). At ``on_train_start`` they also replace Lightning's SIGTERM handler, whose
    "stop after this step" would race with the save. Outside of training a signal gets its
    previous handling.

    SIGINT (Ctrl-C) is handled alike; a second one before the save aborts at once
    (``KeyboardInterrupt``), saying that the steps since the last checkpoint are lost.

    Args:
        signals: signal names (or numbers) to handle.
    """

    def __init__(self, signals: Sequence[str | int] = ("SIGTERM", "SIGUSR1", "SIGINT")) -> None:
        raise_problems(PreemptionHandler.problems(**own_arguments(locals())))
        self.signals = [_signal_number(s) for s in signals]
        self._received: int | None = None
        self._active = False
        self._previous: dict[int, Any] = {}
        self.preempted_by: str | None = None
        self.saved_step: int | None = None
        self.requeued = False

    @staticmethod
    def problems(**kwargs: Any) -> list[str]:
        """Every problem of these constructor arguments, named as its config keys."""
        given = inspect.signature(PreemptionHandler).bind_partial(**kwargs)
        given.apply_defaults()
        unknown = [n for n in given.arguments["signals"] or () if _signal_number(n) is None]
        return [f"signals: {n!r} is not a signal name (e.g. SIGTERM)" for n in unknown]

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: a signal handler runs between two bytecodes of the step, where neither a
        # save nor logging (whose lock the interrupted code may hold) is safe.
        if self._active:
            if self._received is None:
                self._received = signum
                if signum == signal.SIGINT:
                    _say(
                        "Ctrl-C: saving a checkpoint at the end of this step, then stopping "
                        "(Ctrl-C again to abort at once, unsaved)"
                    )
            elif signum == signal.SIGINT and self.preempted_by is None:
                _say("second Ctrl-C: aborting now; the steps since the last saved checkpoint are lost")
                raise KeyboardInterrupt
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # default action (e.g. terminate) as if we were not here
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _slurm_requeue_signal(self, trainer: L.Trainer) -> signal.Signals | None:
        env = _cluster_environment(trainer)
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            return signal.Signals(env.requeue_signal or signal.SIGUSR1)
        return None

    def _handled(self, trainer: L.Trainer) -> set[signal.Signals]:
        requeue = self._slurm_requeue_signal(trainer)
        return {*self.signals, *([requeue] if requeue is not None else [])}

    def _install(self, trainer: L.Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionHandler: not in the main thread, signals are not handled")
            return
        for signum in self._handled(trainer):
            current = signal.getsignal(signum)
            if current != self._on_signal:
                self._previous.setdefault(signum, current)
                signal.signal(signum, self._on_signal)
        self._active = True

    def _uninstall(self, final: bool = False) -> None:
        # Lightning puts back what it found at its registration (ours) after on_train_end and on
        # exceptions; inactive, ours then passes signals on to the previous handlers. The last
        # restore happens at teardown.
        self._active = False
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if final:
            self._previous = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if _resume_checkpoint(trainer) is None:
            raise ValueError(
                "PreemptionHandler needs a ResumeCheckpoint callback (callbacks.resume_checkpoint) to "
                "save to; add one or remove callbacks.preemption"
            )
        self._received, self.preempted_by, self.saved_step, self.requeued = None, None, None, False
        self._install(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum in self._handled(trainer):  # Lightning composed its own SIGTERM handler meanwhile
            if (
                signal.getsignal(signum) != self._on_signal
                and threading.current_thread() is threading.main_thread()
            ):
                signal.signal(signum, self._on_signal)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._uninstall()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._uninstall(final=True)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._uninstall()

    def _agreed_signal(self, trainer: L.Trainer) -> int:
        """The signal received by any rank (0: none). One tiny all-reduce per step with DDP."""
        local = self._received or 0
        if trainer.world_size == 1:
            return local
        flag = torch.tensor(float(local), device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(flag, reduce_op="max").item())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        signum = self._agreed_signal(trainer)
        if not signum or self.preempted_by is not None:
            return
        name = signal.Signals(signum).name
        checkpoint = _resume_checkpoint(trainer)
        assert checkpoint is not None  # checked at setup
        checkpoint.save_now(trainer)
        self.preempted_by, self.saved_step = name, trainer.global_step
        if signum == self._slurm_requeue_signal(trainer) and trainer.is_global_zero:
            self.requeued = requeue_slurm_job()
        trainer.should_stop = True
        if trainer.is_global_zero:
            log.warning(
                "%s received: checkpoint of step %d saved to %s; stopping%s",
                name,
                trainer.global_step,
                checkpoint.last_model_path,
                " (SLURM job requeued)" if self.requeued else "",
            )


# ------------------------------------------------------------------------------------------ NaN / Inf
def _format_parts(metrics: dict[str, Any]) -> str:
    parts = []
    for key in LOSS_PARTS:
        if key in metrics:
            parts.append(f"{key.removeprefix('train/')}={float(metrics[key]):.6g}")
    return ", ".join(parts) or "no loss parts logged"


class NonFiniteGuard(L.Callback):
    """Stop (or skip the update) when the loss or a gradient is NaN or infinite.

    Checked after the backward pass, before the optimizer step (and so before the EMA update of
    the target network): with ``on_nonfinite="stop"`` the run ends with
    :class:`NonFiniteLossError` and no checkpoint is written, so the last good one stays as it
    was; with ``"skip_step"`` the gradients of that batch are dropped (no parameter moves) and a
    warning names the step, up to ``max_consecutive_skips`` batches in a row, after which the run
    stops as with ``"stop"``. With fp16 mixed precision the gradient check is left to the loss
    scaler, which skips overflowing steps by itself.

    Args:
        on_nonfinite: ``stop`` or ``skip_step``.
        max_consecutive_skips: with ``skip_step``, non-finite batches in a row tolerated.
    """

    def __init__(self, on_nonfinite: str = "stop", max_consecutive_skips: int = 10) -> None:
        raise_problems(NonFiniteGuard.problems(**own_arguments(locals())))
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps: list[int] = []
        self._consecutive = 0
        self._loss: torch.Tensor | None = None

    @staticmethod
    def problems(**kwargs: Any) -> list[str]:
        """Every problem of these constructor arguments, named as its config keys."""
        given = inspect.signature(NonFiniteGuard).bind_partial(**kwargs)
        given.apply_defaults()
        mode, skips = given.arguments["on_nonfinite"], given.arguments["max_consecutive_skips"]
        problems = []
        if mode not in ON_NONFINITE:
            problems.append(f"on_nonfinite={mode!r} is unknown; allowed: {', '.join(ON_NONFINITE)}")
        if not (is_int(skips) and skips >= 0):
            problems.append(f"max_consecutive_skips={skips} must be an integer >= 0")
        return problems

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss_ok = self._loss is None or bool(torch.isfinite(self._loss).all())
        grads_ok = True
        # fp16 loss scaling produces (and handles) infinite gradients on purpose.
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                grads_ok = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        bad = not (loss_ok and grads_ok)
        if trainer.world_size > 1:  # every rank must take the same branch
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self._consecutive = 0
            return

        what = "loss" if not loss_ok else "gradients"
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        parts = _format_parts(trainer.callback_metrics)
        if self.on_nonfinite == "skip_step" and self._consecutive < self.max_consecutive_skips:
            self._consecutive += 1
            self.skipped_steps.append(trainer.global_step)
            optimizer.zero_grad(set_to_none=True)  # the optimizer leaves parameters without grads alone
            rank_zero_warn(f"non-finite {what} at {where}: {parts}; this batch's update is skipped")
            return
        limit = (
            f" ({self._consecutive + 1} non-finite batches in a row, max_consecutive_skips="
            f"{self.max_consecutive_skips})"
            if self.on_nonfinite == "skip_step"
            else ""
        )
        raise NonFiniteLossError(
            f"non-finite {what} at {where}{limit}: {parts}. Training stopped before this update; "
            f"{_last_checkpoint_note(trainer)}. Usual remedies: a lower model.optim.ref_lr, "
            "model.optim.clip_grad, trainer.precision=32-true; or "
            "callbacks.nonfinite.on_nonfinite=skip_step to skip such batches."
        )


# ------------------------------------------------------------------------------------------ collapse
class CollapseMonitor(L.Callback):
    """Warn loudly (optionally stop) when the targets use too few prototypes for too long.

    At every logging step (``trainer.log_every_n_steps``) it reads the logged metric
    ``train/num_prototypes_used``, the number of distinct prototypes that are the most likely
    target of at least one image of the batch, out of what the batch can reach, ``min(K, batch
    size)``; :class:`~msn.eval.online.CollapseRule` decides and words the collapse: ``patience``
    readings below ``min_fraction`` in a row raise one
    :class:`~msn.eval.online.PrototypeCollapseWarning` (again only after a recovery), or
    :class:`PrototypeCollapseError` with ``stop=True``.

    Args:
        min_fraction: threshold in (0, 1]; 0 disables the monitor.
        patience: consecutive low logging steps before it warns (>= 1).
        stop: stop the run instead of only warning.
        metric: the logged count of used prototypes.
    """

    def __init__(
        self,
        min_fraction: float = 0.1,
        patience: int = 5,
        stop: bool = False,
        metric: str = "train/num_prototypes_used",
    ) -> None:
        raise_problems(CollapseMonitor.problems(**own_arguments(locals())))
        self.min_fraction = float(min_fraction)
        self.patience = patience
        self.stop = bool(stop)
        self.metric = metric
        self.rule = CollapseRule(self.min_fraction, patience)
        self.warnings: list[str] = []

    @staticmethod
    def problems(**kwargs: Any) -> list[str]:
        """Every problem of these constructor arguments, named as its config keys."""
        given = inspect.signature(CollapseMonitor).bind_partial(**kwargs)
        given.apply_defaults()
        a = given.arguments
        return CollapseRule.problems(a["min_fraction"], a["patience"], fraction_key="min_fraction")

    @property
    def low_streak(self) -> int:
        """Low readings in a row so far."""
        return self.rule.low_streak

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % trainer.log_every_n_steps != 0:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        batch_size = int(batch[0][0].shape[0])  # (views, labels): rows of the target view
        message = self.rule.check(
            float(value),
            int(pl_module.prototypes.shape[0]),
            batch_size,
            f"at step {trainer.global_step}",
            f"the targets of the last {self.patience} logged batches used",  # reported at the patience-th
        )
        if message is None:
            return
        self.warnings.append(message)
        if self.stop:
            raise PrototypeCollapseError(
                f"{message} Stopped (callbacks.collapse.stop=true); {_last_checkpoint_note(trainer)}."
            )
        self.rule.warn(message)
        log.warning(message)
