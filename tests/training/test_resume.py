"""Exact resume: a data stream that restarts mid-epoch, random states in checkpoints, and real
train.py runs killed with SIGKILL / SIGTERM and resumed."""

from __future__ import annotations

import csv
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from msn.data import MSNDataModule
from msn.data.resumable import ResumableSampler, SeededDataset, data_position
from msn.training.checkpointing import collect_rng_states, restore_rng_states
from msn.training.guards import PreemptionHandler
from tests.helpers import FAST

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"rand_size": 16, "focal_size": 8, "focal_views": 1}


class RandomViews(Dataset):
    """Draws from torch's global generator, like the augmentation does."""

    def __len__(self) -> int:
        return 30

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.rand(3), index


# ------------------------------------------------------------------------------------------ data stream
def test_sampler_restarts_mid_epoch_with_the_same_indices_and_seeds():
    full = ResumableSampler(range(30), batch_size=4, seed=3)
    full.set_epoch(2)
    whole = list(full)
    assert sorted(i for i, _ in whole) == list(range(30))
    resumed = ResumableSampler(range(30), batch_size=4, seed=3)
    resumed.set_position(2, 5)
    resumed.set_epoch(2)  # Lightning calls this again for the resumed epoch: the position stays
    assert list(resumed) == whole[20:]
    resumed.set_epoch(3)  # the next epoch starts from its beginning, with a new permutation
    epoch3 = list(resumed)
    assert len(epoch3) == 30 and [i for i, _ in epoch3] != [i for i, _ in whole]
    # Same index in another epoch: another augmentation seed.
    assert dict(epoch3)[7] != dict(whole)[7]


def test_sampler_splits_ranks_disjointly():
    ranks = [ResumableSampler(range(30), batch_size=5, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    indices = [[i for i, _ in sampler] for sampler in ranks]
    assert len(indices[0]) == len(indices[1]) == 15 and sorted(indices[0] + indices[1]) == list(range(30))


def test_data_position_moves_a_finished_epoch_to_the_next():
    assert data_position(4, 7, 10) == (4, 7)
    assert data_position(4, 10, 10) == (5, 0)
    assert data_position(0, 0, float("inf")) == (0, 0)


def _batches(num_workers: int) -> list[torch.Tensor]:
    sampler = ResumableSampler(RandomViews(), batch_size=6, seed=1)
    # As in MSNDataModule: the loader's own generator draws the workers' base seeds.
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(
        SeededDataset(RandomViews()),
        batch_size=6,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
    )
    return [x for x, _ in loader]


def test_seeded_data_is_the_same_with_any_number_of_workers_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    in_process = _batches(0)
    assert torch.equal(torch.get_rng_state(), before)  # masking in the training process is undisturbed
    with_workers = _batches(2)
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True))
    assert not torch.equal(in_process[0][0], in_process[0][1])  # still random across samples


def _fake_trainer(epoch: int, batch_idx: int, batches: int) -> SimpleNamespace:
    return SimpleNamespace(
        current_epoch=epoch,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=batch_idx)),
        num_training_batches=batches,
        world_size=1,
        global_rank=0,
    )


def _datamodule() -> MSNDataModule:
    return MSNDataModule(name="digits", in_chans=1, batch_size=16, transform=dict(SMALL), eval_img_size=16)


def test_datamodule_state_continues_with_the_next_batch():
    dm = _datamodule()
    dm.trainer = _fake_trainer(epoch=1, batch_idx=4, batches=84)  # 5 batches of epoch 1 done
    state = dm.state_dict()
    assert state == {"epoch": 1, "batches_done": 5, "batch_size": 16, "world_size": 1}
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    expected = [views[0] for views, _ in islice(loader, 8)][5:]

    resumed = _datamodule()
    resumed.trainer = _fake_trainer(epoch=0, batch_idx=-1, batches=84)
    resumed.load_state_dict(state)
    got = [views[0] for views, _ in islice(resumed.train_dataloader(), 3)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    # Saved after the last batch of an epoch: the next epoch's start.
    dm.trainer = _fake_trainer(epoch=1, batch_idx=83, batches=84)
    assert dm.state_dict()["epoch"] == 2 and dm.state_dict()["batches_done"] == 0


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    torch.save({"rng_states": collect_rng_states()}, tmp_path / "c.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_states(torch.load(tmp_path / "c.ckpt", weights_only=True)["rng_states"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


# ------------------------------------------------------------------------------------------ train.py
TINY = [
    *FAST,
    "trainer.deterministic=true",
    "+trainer.limit_train_batches=5",  # 5-step epochs: a few epoch boundaries in a short run
    "trainer.max_epochs=4",
    "trainer.max_steps=14",
    "lowshot.enabled=false",
    "callbacks.resume_checkpoint.every_n_train_steps=3",
    "+logger.csv.flush_logs_every_n_steps=1",
    # PIL views in the workers (the official path, drawn from the random states the checkpoint
    # carries) and a focal view: the digits default makes its views on the device and has none.
    "data.augment_on=workers",
    "data.transform.focal_views=1",
]


def _cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *TINY, *overrides]


def _losses(run_dir: Path) -> dict[int, str]:
    """step -> logged train/loss (as written); a step logged twice (killed, then resumed) keeps the
    resumed run's value."""
    out = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = row["train/loss"]
    return out


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if (run_dir / "csv" / "metrics.csv").exists() and max(_losses(run_dir), default=-1) >= step:
            return
        time.sleep(0.05)
    raise TimeoutError(f"train.py did not reach step {step}")


def _start(run_dir: Path, *overrides: str, **popen_kw: object) -> subprocess.Popen:
    """train.py in the background, from the folder above ``run_dir``."""
    return subprocess.Popen(
        _cmd(run_dir, *overrides),
        cwd=run_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen_kw,
    )


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted run that keeps every step checkpoint (steps 3, 5, 6, 9, 10, 12, 14)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = _run(_cmd(run, "callbacks.resume_checkpoint.keep_last=20"), run.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(_losses(run)) == list(range(14))
    return run


@pytest.mark.slow
def test_resume_from_an_epoch_end_checkpoint_keeps_the_epoch_boundaries(reference_run, tmp_path):
    # Step 10 ends epoch 1 (5-step epochs) and is not a multiple of the 3-step interval: it is
    # the epoch-end save. Resumed from it, epoch 2 must start at step 10, as in the reference.
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(reference_run / "checkpoints" / "step00000010.ckpt", run / "checkpoints" / "last.ckpt")
    proc = _run(_cmd(run, "ckpt_path=last"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _losses(reference_run)
    resumed = _losses(run)
    # Step 9's row comes from the checkpoint (its run dir here has no metrics file).
    assert sorted(resumed) == [9, 10, 11, 12, 13]
    assert resumed == {step: expected[step] for step in resumed}
    with open(run / "csv" / "metrics.csv") as f:
        epochs = {int(r["step"]): int(r["epoch"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert epochs == {9: 1, 10: 2, 11: 2, 12: 2, 13: 2}


@pytest.mark.slow
def test_a_resume_writes_the_metrics_row_a_kill_lost_and_keeps_the_earlier_rows(reference_run, tmp_path):
    # As after a SIGKILL right after the save of step 6: the checkpoint counts steps 0-5 as done,
    # but the row of step 5 (logged by Lightning after the save) never reached the file.
    run = tmp_path / "killed"
    (run / "checkpoints").mkdir(parents=True)
    (run / "csv").mkdir()
    shutil.copy(reference_run / "checkpoints" / "step00000006.ckpt", run / "checkpoints" / "last.ckpt")
    with open(reference_run / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    with open(run / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["step"] and int(r["step"]) < 5)
    assert sorted(_losses(run)) == [0, 1, 2, 3, 4]
    proc = _run(_cmd(run, "ckpt_path=last"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(run) == _losses(reference_run)  # every step, in the run's own file


@pytest.mark.slow
def test_resume_with_views_made_on_the_device_repeats_them(tmp_path):
    # augment_on=device draws its crops from the batch's sample seeds, not from the random states
    # in the checkpoint: the resumed run must still see the uninterrupted run's views.
    reference = tmp_path / "reference"
    device = ("data.augment_on=device", "data.num_workers=0")
    proc = _run(_cmd(reference, *device, "callbacks.resume_checkpoint.keep_last=20"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(reference / "checkpoints" / "step00000006.ckpt", run / "checkpoints" / "last.ckpt")
    proc = _run(_cmd(run, *device, "ckpt_path=last"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, resumed = _losses(reference), _losses(run)
    assert sorted(resumed) == list(range(5, 14))  # step 5's row from the checkpoint
    assert resumed == {step: expected[step] for step in resumed}


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_logs_the_uninterrupted_losses(reference_run, tmp_path):
    expected = _losses(reference_run)

    # Killed at a random moment after a random step (possibly inside a checkpoint write), with
    # DataLoader workers this time: the data stream must not depend on them.
    kill_after = random.Random().randint(2, 11)
    run = tmp_path / "killed"
    proc = _start(run, "data.num_workers=1")
    _wait_for_step(proc, run, kill_after)
    proc.kill()  # SIGKILL
    proc.communicate()
    # The kill may fall between writing a step file and last.ckpt: the resume point is the newest
    # step among the finished resume files (a cut write leaves only a hidden ``.tmp`` file).
    ckpt_dir = run / "checkpoints"
    saved = max(
        torch.load(path, map_location="cpu", weights_only=True)["global_step"]
        for path in [ckpt_dir / "last.ckpt", *ckpt_dir.glob("step*.ckpt")]
        if path.is_file()
    )
    assert saved > 0 and (saved % 3 == 0 or saved % 5 == 0), saved  # every 3 steps and at epoch ends

    before = _losses(run)
    assert all(before[step] == expected[step] for step in before)
    # The resumed run logs into the same run dir: its CSV keeps the rows of the steps the resume
    # point counts as done (the last of which the checkpoint carries, saved before Lightning
    # logged it), so the file ends with every step, as the uninterrupted run's.
    proc = _run(_cmd(run, "data.num_workers=1", "ckpt_path=last"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ended before the epoch ended" not in proc.stderr  # the data module restores its position
    resumed = _losses(run)
    assert sorted(resumed) == list(range(14)), f"killed after {kill_after}, resumed at {saved}"
    assert resumed == expected, f"killed after {kill_after}, resumed at {saved}"


@pytest.mark.slow
def test_sigterm_saves_at_the_end_of_the_step_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    proc = _start(run, "trainer.max_steps=200", "trainer.max_epochs=100")
    _wait_for_step(proc, run, 4)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    step = state["global_step"]
    # The step that was running finished and was saved; nothing ran after it.
    assert max(_losses(run)) == step - 1 and 4 < step < 200
    assert (
        f"stopped by SIGTERM: checkpoint of step {step} saved to {run / 'checkpoints' / 'last.ckpt'}"
        in stdout
    )
    assert "ckpt_path=last" in stdout
    assert not (run / "lowshot.json").exists()


@pytest.mark.slow
def test_ctrl_c_saves_prints_the_resume_command_and_resumes_to_the_uninterrupted_losses(
    reference_run, tmp_path
):
    expected = _losses(reference_run)
    run = tmp_path / "interrupted"
    # Its own process group, so that the SIGINT reaches train.py and its DataLoader worker alike,
    # as Ctrl-C in a terminal does.
    proc = _start(run, "data.num_workers=1", start_new_session=True)
    _wait_for_step(proc, run, 4)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "Ctrl-C: saving a checkpoint at the end of this step" in stderr
    step = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    before = _losses(run)
    assert sorted(before) == list(range(step)) and 4 < step < 14
    assert f"stopped by SIGINT: checkpoint of step {step}" in stdout
    # The printed command resumes in the same run dir, to the uninterrupted run's losses.
    command = next(line for line in stdout.splitlines() if line.startswith("resume with: "))
    words = shlex.split(command.removeprefix("resume with: "))
    assert words[:2] == ["python", "train.py"] and f"hydra.run.dir={run}" in words
    proc = _run([sys.executable, str(ROOT / "train.py"), *words[2:]], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(run) == expected  # one file with every step, nothing lost


def test_a_second_ctrl_c_aborts_at_once():
    handler = PreemptionHandler()
    handler._active = True
    handler._on_signal(signal.SIGINT, None)  # the first: save at the end of the step
    assert handler._received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        handler._on_signal(signal.SIGINT, None)
