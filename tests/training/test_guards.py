"""Atomic checkpoints, the rotating resume point, preemption (SLURM), NaN/Inf and collapse guards."""

from __future__ import annotations

import errno
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.environments import SLURMEnvironment
from PIL import Image

import msn.training.checkpointing as checkpointing
from msn.checks import ConfigError
from msn.cli.common import CONFIG_DIR
from msn.cli.train import (
    check_resume_point,
    requested_ckpt_path,
    resolve_ckpt_path,
    train,
    without_foreign_default_recipe,
)
from msn.data import MSNDataModule
from msn.data.decode import BadImageError
from msn.eval.online import PrototypeCollapseWarning
from msn.loss import MSNLoss
from msn.module import MSNModule
from msn.training.checkpointing import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    ResumeCheckpoint,
    atomic_torch_save,
    checkpoint_is_complete,
    remove_stale_tmp,
)
from msn.training.guards import (
    CollapseMonitor,
    NonFiniteGuard,
    NonFiniteLossError,
    PreemptionHandler,
    PrototypeCollapseError,
)
from msn.training.resume import RUN_KEY, SIGNATURE_KEYS, newest_resume_checkpoint, run_signature
from tests.helpers import FAST, UNREADABLE, bad_image_folder, tiny_module


def _module(num_prototypes: int = 16, **kw) -> MSNModule:
    kw = {"optim": {"warmup_epochs": 1}, "mask_ratio": 0.15, "mask_seed": None, **kw}
    return tiny_module(num_prototypes=num_prototypes, **kw)


def _datamodule() -> MSNDataModule:
    return MSNDataModule(
        name="digits", in_chans=1, batch_size=16, transform=dict(rand_size=16, focal_size=8, focal_views=1)
    )


def _trainer(tmp_path: Path, callbacks: list, **kw) -> L.Trainer:
    kw.setdefault("max_epochs", 2)
    kw.setdefault("limit_train_batches", 3)
    kw.setdefault("plugins", [AtomicCheckpointIO()])
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        **kw,
    )


# ------------------------------------------------------------------------------------------ atomic writes
def test_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError) as err:
        atomic_torch_save({"step": 2}, path)
    assert str(err.value) == (
        f"[Errno {errno.ENOSPC}] could not write checkpoint {path} (No space left on device); "
        "the previous last.ckpt is unchanged"
    )
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    def killed(obj, f):
        f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt  # any interruption, not only OSError

    monkeypatch.setattr(checkpointing.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 1 and len(list(tmp_path.iterdir())) == 1


SAVE_LOOP = """
import sys, torch
from msn.training.checkpointing import atomic_torch_save
step = 0
while True:
    step += 1
    atomic_torch_save({"step": step, "w": torch.full((2_000_000,), float(step))}, sys.argv[1])
    print(step, flush=True)
"""


def test_sigkill_during_saves_never_leaves_a_broken_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVE_LOOP, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    # Saves follow each other without a pause, so the kill lands inside one (most of the time in
    # the middle of writing 8 MB, or between the write and the rename).
    for _ in range(3):
        proc.stdout.readline()
    time.sleep(0.01)
    proc.kill()
    proc.communicate()
    state = torch.load(path, weights_only=True)
    assert checkpoint_is_complete(path)
    assert torch.equal(state["w"], torch.full((2_000_000,), float(state["step"])))
    remove_stale_tmp(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_truncated_checkpoint_is_detected_and_passed_over(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    atomic_torch_save({"step": 4}, ckpt / "step00000004.ckpt")
    atomic_torch_save({"step": 6}, ckpt / "last.ckpt")
    assert newest_resume_checkpoint(ckpt) == ckpt / "last.ckpt"
    data = (ckpt / "last.ckpt").read_bytes()
    (ckpt / "last.ckpt").write_bytes(data[: len(data) // 2])  # e.g. copied by a tool that was killed
    assert not checkpoint_is_complete(ckpt / "last.ckpt")
    assert resolve_ckpt_path("last", tmp_path / "run") == str(ckpt / "step00000004.ckpt")
    # A new run dir of the same experiment resumes from the newest complete one of its siblings.
    assert resolve_ckpt_path("last", tmp_path / "new_run") == str(ckpt / "step00000004.ckpt")
    assert resolve_ckpt_path("last", tmp_path / "elsewhere" / "run") is None


def test_a_step_file_written_after_last_ckpt_is_the_resume_point(tmp_path):
    # A kill between writing the step file and last.ckpt leaves the step file the newer one.
    ckpt = tmp_path / "run" / "checkpoints"
    atomic_torch_save({"step": 3}, ckpt / "last.ckpt")
    atomic_torch_save({"step": 3}, ckpt / "step00000003.ckpt")
    atomic_torch_save({"step": 5}, ckpt / "step00000005.ckpt")
    for name, mtime in (("step00000003.ckpt", 100), ("last.ckpt", 101), ("step00000005.ckpt", 102)):
        os.utime(ckpt / name, (mtime, mtime))
    assert resolve_ckpt_path("last", tmp_path / "run") == str(ckpt / "step00000005.ckpt")


def _signature(**changes) -> dict:
    sig = {
        "model.encoder": {"arch": "vit_nano", "patch_size": 8, "img_size": 16, "in_chans": 1},
        "model.num_prototypes": 256,
        "data.name": "digits",
        "data.root": None,
    }
    return {**sig, **changes}


def _recorded(path: Path, signature: dict, mtime: int) -> None:
    atomic_torch_save({RUN_KEY: {"signature": signature, "output_dir": str(path.parent.parent)}}, path)
    os.utime(path, (mtime, mtime))


def test_last_resumes_only_a_run_of_the_same_kind(tmp_path):
    digits = tmp_path / "msn" / "a" / "checkpoints" / "last.ckpt"
    folder = tmp_path / "msn" / "b" / "checkpoints" / "last.ckpt"
    _recorded(digits, _signature(), 100)
    foreign = _signature(**{"data.name": "imagefolder", "data.root": "/data/x"})
    foreign["model.encoder"] = {**foreign["model.encoder"], "in_chans": 3}
    _recorded(folder, foreign, 200)  # newer, but another configuration
    assert resolve_ckpt_path("last", tmp_path / "msn" / "new", _signature()) == str(digits)
    # Nothing of this kind: one line naming both runs and what differs.
    digits.unlink()
    with pytest.raises(ConfigError) as err:
        resolve_ckpt_path("last", tmp_path / "msn" / "new", _signature())
    message = str(err.value)
    assert (
        "\n" not in message
        and str(folder.parent.parent) in message
        and str(tmp_path / "msn" / "new") in message
    )
    assert "data.name: 'imagefolder' there, 'digits' here" in message
    assert "model.encoder.in_chans: 3 there, 1 here" in message


def test_last_checks_checkpoints_without_a_record_by_the_modules_hyper_parameters(tmp_path):
    old = tmp_path / "msn" / "a" / "checkpoints" / "last.ckpt"
    atomic_torch_save({"hyper_parameters": {"encoder": {"arch": "vit_small", "in_chans": 3}}}, old)
    with pytest.raises(ConfigError, match="model.encoder.arch: 'vit_small' there, 'vit_nano' here"):
        resolve_ckpt_path("last", tmp_path / "msn" / "new", _signature())


def test_signature_of_the_config_holds_architecture_data_and_views():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra.run.dir=x"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    sig = run_signature(cfg)
    assert sig["model.encoder"]["patch_size"] == 8 and sig["data.transform.rand_size"] == 16
    assert set(sig) == set(SIGNATURE_KEYS)


@pytest.mark.parametrize(
    ("overrides", "kept"),
    [
        ([], True),
        (["data=digits", "trainer.max_epochs=3"], True),
        (["data=imagefolder", "data.root=/x", "model=vit_small", "model.encoder.patch_size=16"], False),
        (["model=vit_tiny"], False),
        (["experiment=fmnist_cpu"], True),  # an experiment chosen: nothing is added
        (["data=imagefolder", "experiment=msn_vits16"], True),
    ],
)
def test_the_digits_recipe_applies_only_to_the_data_and_model_it_was_made_for(overrides, kept):
    out = without_foreign_default_recipe(overrides)
    assert (out == overrides) is kept and (kept or out == [*overrides, "~experiment"])


def test_another_data_set_gets_its_own_name_and_the_official_defaults():
    overrides = without_foreign_default_recipe(["data=imagefolder", "data.root=/x", "model=vit_small"])
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert cfg.name == "imagefolder_vit_small_p16"
    assert (cfg.data.batch_size, cfg.model.num_prototypes, cfg.model.head.hidden_dim) == (64, 1024, 2048)


@pytest.mark.parametrize("kind", ["truncated", "png", "plain_dict", "weights_only"])
def test_a_checkpoint_that_cannot_resume_is_refused_with_one_line(tmp_path, kind):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        atomic_torch_save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:500])
    elif kind == "png":
        Image.new("RGB", (4, 4)).save(path, format="PNG")
    elif kind == "plain_dict":
        torch.save({"w": torch.zeros(3)}, path)
    else:  # weights of a finished run exported without the trainer state
        model = tiny_module()
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    with pytest.raises(ConfigError) as err:
        check_resume_point(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    if kind == "weights_only":
        assert f"init_from={path}" in str(err.value)


def test_requeued_slurm_job_resumes_by_itself():
    assert requested_ckpt_path(None, {"SLURM_RESTART_COUNT": "2"}) == "last"
    assert requested_ckpt_path(None, {"SLURM_RESTART_COUNT": "0"}) is None
    assert requested_ckpt_path("/x.ckpt", {"SLURM_RESTART_COUNT": "1"}) == "/x.ckpt"
    assert requested_ckpt_path(None, {}) is None


# ------------------------------------------------------------------------------------------ resume point
class RecordingIO(AtomicCheckpointIO):
    def __init__(self) -> None:
        super().__init__()
        self.saved: list[tuple[str, int]] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.saved.append((Path(path).name, checkpoint["global_step"]))
        super().save_checkpoint(checkpoint, path, storage_options)


def test_resume_checkpoint_every_n_steps_at_epoch_ends_and_rotates(tmp_path):
    io = RecordingIO()
    cb = ResumeCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, keep_last=2)
    trainer = _trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=3)
    trainer.strategy.checkpoint_io = io
    trainer.fit(_module(), datamodule=_datamodule())
    # Steps 2 and 4 (interval), 3 and 6 (epoch ends; 6 is also a multiple of 2: saved once).
    assert [s for name, s in io.saved if name == "last.ckpt"] == [2, 3, 4, 6]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "last.ckpt",
        "step00000004.ckpt",
        "step00000006.ckpt",
    ]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_resume_checkpoint_saves_the_final_step_between_intervals(tmp_path):
    cb = ResumeCheckpoint(tmp_path, every_n_train_steps=100, keep_last=0)
    _trainer(tmp_path, [cb], max_steps=4, max_epochs=5).fit(_module(), datamodule=_datamodule())
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_train_steps": 0}, "ResumeCheckpoint every_n_train_steps=0 must be an integer >= 1"),
        ({"keep_last": -1}, "ResumeCheckpoint keep_last=-1 must be an integer >= 0"),
        ({"save_last": False}, "ResumeCheckpoint save_last=False must be true or 'link'"),
        ({"save_last": "link", "keep_last": 0}, "ResumeCheckpoint save_last='link' needs keep_last >= 1"),
    ],
)
def test_resume_checkpoint_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as err:
        ResumeCheckpoint(tmp_path, **kwargs)
    assert str(err.value).startswith(message)
    # One rule: the constructor says what its problems function (validate_config's source) finds.
    assert str(err.value) == "ResumeCheckpoint " + "; ".join(ResumeCheckpoint.problems(**kwargs))


# ------------------------------------------------------------------------------------------ preemption
class SignalAt(L.Callback):
    """Sends a signal to this very process in the middle of a step."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigusr1_on_slurm_saves_after_the_step_requeues_and_stops(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NAME": "msn",
    }.items():
        monkeypatch.setenv(key, value)
    before = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler(signals=["SIGTERM"])  # SIGUSR1 comes from SLURMEnvironment's requeue_signal
    resume = ResumeCheckpoint(tmp_path / "ckpt", every_n_train_steps=100)
    trainer = _trainer(
        tmp_path,
        [SignalAt(2, signal.SIGUSR1), handler, resume],
        max_epochs=5,
        plugins=[AtomicCheckpointIO(), SLURMEnvironment(auto_requeue=True)],
    )
    trainer.fit(_module(), datamodule=_datamodule())
    # The step that was running when the signal came (the third) finished, was saved, and was the last.
    assert (handler.preempted_by, handler.saved_step, trainer.global_step) == ("SIGUSR1", 3, 3)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert handler.requeued and (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))  # Lightning's own mid-step SLURM save did not run
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers are given back after training


def test_preemption_needs_a_resume_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="PreemptionHandler needs a ResumeCheckpoint callback"):
        _trainer(tmp_path, [PreemptionHandler()], max_steps=1).fit(_module(), datamodule=_datamodule())
    with pytest.raises(ValueError, match=r"^signals: 'SIGNOPE' is not a signal name \(e\.g\. SIGTERM\)$"):
        PreemptionHandler(signals=["SIGNOPE"])
    assert PreemptionHandler(signals=["SIGTERM", 10]).signals == [signal.SIGTERM, signal.SIGUSR1]
    assert PreemptionHandler.problems(signals=["SIGTERM", "SIGNOPE", 0]) == [
        "signals: 'SIGNOPE' is not a signal name (e.g. SIGTERM)",
        "signals: 0 is not a signal name (e.g. SIGTERM)",
    ]


# ------------------------------------------------------------------------------------------ NaN / Inf
def _compose(tmp_path: Path, *overrides: str):
    extra = ["trainer.max_steps=8", "lowshot.enabled=false"]
    extra.append("callbacks.resume_checkpoint.every_n_train_steps=2")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"output_dir={tmp_path}", *FAST, *extra, *overrides])


def _nan_from_call(monkeypatch, call: int, count: int = 1) -> None:
    """Every MSNLoss forward number call..call+count-1 (0-based, one per step) returns a NaN loss."""
    original = MSNLoss.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if call <= calls["n"] < call + count:
            out.loss = out.loss * float("nan")
            out.ce = out.ce * float("nan")
        calls["n"] += 1
        return out

    monkeypatch.setattr(MSNLoss, "forward", forward)


def test_nan_loss_stops_with_step_and_parts_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _nan_from_call(monkeypatch, call=5)
    with pytest.raises(NonFiniteLossError) as err:
        train(_compose(tmp_path))
    message = str(err.value)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert message.startswith("non-finite loss at step 5 (epoch 0): loss=nan, ce=nan, me_max=")
    assert f"the last good checkpoint {last} is untouched (resume: ckpt_path=last)" in message
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_nan_loss_skip_step_drops_only_that_update(tmp_path, monkeypatch):
    _nan_from_call(monkeypatch, call=3)
    with pytest.warns(UserWarning, match=r"non-finite loss at step 3 \(epoch 0\): loss=nan, ce=nan"):
        result = train(_compose(tmp_path, "callbacks.nonfinite.on_nonfinite=skip_step"))
    state = torch.load(result["last_checkpoint"], weights_only=True)
    assert state["global_step"] == 8  # the skipped batch still counts as a step
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_nonfinite_guard_gives_up_after_too_many_skips():
    guard = NonFiniteGuard(on_nonfinite="skip_step", max_consecutive_skips=2)
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=1.0)
    trainer = SimpleNamespace(
        precision_plugin=None,
        world_size=1,
        global_step=7,
        current_epoch=1,
        callback_metrics={"train/loss": torch.tensor(math.inf)},
        checkpoint_callbacks=[],
    )
    for step in (7, 8):
        trainer.global_step = step
        param.grad = torch.tensor([math.inf, 1.0])
        guard.on_before_backward(trainer, None, torch.tensor(math.inf))
        with pytest.warns(UserWarning, match=f"non-finite loss at step {step}"):
            guard.on_before_optimizer_step(trainer, None, optimizer)
        assert param.grad is None  # the optimizer will not move the parameter
    param.grad = torch.ones(2)
    with pytest.raises(
        NonFiniteLossError, match=r"\(3 non-finite batches in a row, max_consecutive_skips=2\)"
    ):
        guard.on_before_optimizer_step(trainer, None, optimizer)
    assert guard.skipped_steps == [7, 8]
    # A finite loss with a non-finite gradient is caught too.
    stop = NonFiniteGuard()
    stop.on_before_backward(trainer, None, torch.tensor(1.0))
    param.grad = torch.tensor([math.nan, 0.0])
    with pytest.raises(NonFiniteLossError, match="non-finite gradients at step 8"):
        stop.on_before_optimizer_step(trainer, None, optimizer)
    with pytest.raises(ValueError, match=r"^on_nonfinite='ignore' is unknown; allowed: stop, skip_step$"):
        NonFiniteGuard(on_nonfinite="ignore")
    assert NonFiniteGuard.problems(on_nonfinite="skip_step", max_consecutive_skips=True) == [
        "max_consecutive_skips=True must be an integer >= 0"
    ]


# ------------------------------------------------------------------------------------------ collapse
def _reading(monitor: CollapseMonitor, used: float, step: int, batch_size: int = 16) -> None:
    trainer = SimpleNamespace(
        global_step=step,
        log_every_n_steps=1,
        callback_metrics={"train/num_prototypes_used": torch.tensor(used)},
        checkpoint_callbacks=[],
    )
    batch = ([torch.zeros(batch_size, 1, 4, 4)], torch.zeros(batch_size))
    monitor.on_train_batch_end(trainer, SimpleNamespace(prototypes=torch.zeros(32, 4)), None, batch, 0)


def test_collapse_warns_after_patience_once_and_rearms_after_recovery():
    monitor = CollapseMonitor(min_fraction=0.25, patience=3)  # threshold 0.25 x min(32, 16) = 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, used in enumerate([3, 3, 5, 3, 3, 3, 2, 2, 8, 1, 1, 1]):
            _reading(monitor, used, step)
    collapse = [str(w.message) for w in caught if w.category is PrototypeCollapseWarning]
    assert len(collapse) == 2  # steps 5 (third low reading in a row) and 11 (after the recovery at 8)
    assert collapse[0].startswith(
        "PROTOTYPE COLLAPSE at step 5: the targets of the last 3 logged batches used only 3 of K=32 "
        "prototypes (< 0.25 x 16)."
    )
    assert collapse[1].startswith("PROTOTYPE COLLAPSE at step 11")
    stopping = CollapseMonitor(min_fraction=0.25, patience=2, stop=True)
    _reading(stopping, 1, 0)
    with pytest.raises(PrototypeCollapseError, match="Stopped \\(callbacks.collapse.stop=true\\)"):
        _reading(stopping, 1, 1)


def test_collapse_monitor_arguments_are_the_collapse_rule_s():
    assert CollapseMonitor.problems(min_fraction=1.5, patience=0) == [
        "min_fraction=1.5 must be a number in [0, 1]",
        "patience=0 must be an integer >= 1",
    ]
    with pytest.raises(ValueError, match=r"^min_fraction=-1 must be a number in \[0, 1\]$"):
        CollapseMonitor(min_fraction=-1)
    monitor = CollapseMonitor(min_fraction=0.0, patience=1)  # 0 disables it
    for step in range(3):
        _reading(monitor, 0, step)
    assert monitor.warnings == []


def test_collapse_of_a_real_run_is_reported(tmp_path):
    model = _module(num_prototypes=16, optim={"warmup_epochs": 1, "ref_lr": 0.0, "start_lr": 0.0})
    with torch.no_grad():  # identical prototypes: every target picks the same one
        model.prototypes.copy_(model.prototypes[:1].expand_as(model.prototypes))
    monitor = CollapseMonitor(min_fraction=0.5, patience=2)
    with pytest.warns(PrototypeCollapseWarning, match="used only 1 of K=16 prototypes"):
        _trainer(tmp_path, [monitor], max_steps=3, max_epochs=1).fit(model, datamodule=_datamodule())
    assert monitor.low_streak == 3


# ------------------------------------------------------------------------------------------ bad images
def _imagefolder(tmp_path: Path, *overrides: str):
    root = bad_image_folder(tmp_path / "images")
    small = ["data.transform.rand_size=16", "data.transform.focal_size=8", "data.transform.focal_views=1"]
    return _compose(
        tmp_path / "run",
        "data=imagefolder",
        f"data.root={root}",
        *small,
        "model.encoder.patch_size=4",
        "data.batch_size=7",  # the 14 files in 2 batches: one epoch meets every file
        "trainer.max_steps=2",
        *overrides,
    )


def test_train_skips_bad_images_and_reports_them_at_the_end(tmp_path, capsys):
    result = train(_imagefolder(tmp_path))
    log_file = tmp_path / "run" / "bad_images.txt"
    assert f"skipped {len(UNREADABLE)} unreadable image file(s) (list: {log_file})" in capsys.readouterr().out
    assert torch.load(result["last_checkpoint"], weights_only=True)["global_step"] == 2


def test_train_stops_at_a_bad_image_on_request(tmp_path):
    with pytest.raises(BadImageError, match=r"unreadable image .*\(data\.on_bad_image=raise"):
        train(_imagefolder(tmp_path, "data.on_bad_image=raise"))
