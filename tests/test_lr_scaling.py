"""model.optim.lr_scaling: the linear rule, the module's optimizer under it, and the start-up lines
(unscaled lr for another global batch; ME-MAX and Sinkhorn under gradient accumulation)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

from msn.checks import ConfigError
from msn.cli.train import recipe_summary, startup_notes
from msn.module import global_batch, scaled_optim
from msn.training.config import validate_config
from tests.helpers import composed, fit_steps, tiny_module

ROOT = Path(__file__).resolve().parents[1]


def test_global_batch_and_the_linear_rule_against_hand_numbers():
    assert global_batch(64, 2, 4) == 512
    optim = {"start_lr": 2e-4, "ref_lr": 1e-3, "final_lr": 1e-6, "lr_scaling": "linear"}
    scaled = scaled_optim(optim, global_batch(64, 2, 4))
    assert scaled["ref_lr"] == pytest.approx(1e-3 * 64 * 2 * 4 / 1024)  # 5e-4
    assert scaled["ref_lr"] == pytest.approx(5e-4) and scaled["start_lr"] == pytest.approx(1e-4)
    assert scaled["final_lr"] == 1e-6  # the floor of the cosine is not a rate of the batch
    assert scaled_optim(optim, 1024)["ref_lr"] == pytest.approx(1e-3)
    # none (the default) keeps every rate; rule= asks what another rule would give
    assert scaled_optim({**optim, "lr_scaling": "none"}, 512)["ref_lr"] == 1e-3
    assert scaled_optim({"lr_scaling": "none"}, 64, rule="linear")["start_lr"] == pytest.approx(1.25e-5)
    assert scaled_optim({}, 64)["lr_scaling"] == "none"


def test_the_module_scales_by_world_size_and_accumulation():
    model = tiny_module(optim={"lr_scaling": "linear"})
    # 64 per process x 2 processes x 4 accumulated, as the trainer would tell the module.
    model._trainer = SimpleNamespace(
        datamodule=SimpleNamespace(batch_size=64),
        train_dataloader=None,
        fit_loop=SimpleNamespace(),
        world_size=2,
        accumulate_grad_batches=4,
    )
    assert model.run_optim_cfg["ref_lr"] == pytest.approx(5e-4)
    assert model.run_optim_cfg["start_lr"] == pytest.approx(1e-4)
    assert model.optim_cfg["ref_lr"] == 1e-3  # the configured values stay as given
    model._trainer = None
    assert model.run_optim_cfg is model.optim_cfg


class TwoViews(Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        g = torch.Generator().manual_seed(i)
        return [torch.randn(1, 16, 16, generator=g) for _ in range(2)], 0


class LrRecorder(L.Callback):
    def __init__(self) -> None:
        self.before: list[float] = []  # as configure_optimizers left it
        self.stepped: list[list[float]] = []  # what the optimizer step used

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.stepped.append([g["lr"] for g in optimizer.param_groups])


def test_a_one_step_fit_with_linear_scaling_uses_the_scaled_rates():
    model = tiny_module(optim={"lr_scaling": "linear", "start_lr": 2e-4, "ref_lr": 1e-2, "warmup_epochs": 2})
    recorder = LrRecorder()
    loader = DataLoader(TwoViews(), batch_size=8, drop_last=True)
    # 8 per batch x 2 accumulated = 16 per step: the rates x 16/1024 = 1/64.
    fit_steps(model, loader, 1, accumulate_grad_batches=2, callbacks=[recorder])
    start, ref = 2e-4 / 64, 1e-2 / 64  # 3.125e-6, 1.5625e-4
    assert recorder.before[0] == pytest.approx(start)
    # 4 batches of 8 = 2 steps per epoch, 2 warmup epochs: step 0 runs a quarter into the warmup.
    assert recorder.stepped == [[pytest.approx(start + (ref - start) / 4)] * 3]
    assert recorder.stepped[0][0] == pytest.approx(4.140625e-05)


def _notes(*overrides: str, world_size: int = 1) -> tuple[list[str], str]:
    cfg = composed("train", "output_dir=/tmp/unused", *overrides)
    model = instantiate(cfg.model, _convert_="all")
    return startup_notes(cfg, model, world_size), recipe_summary(cfg, model, world_size)


def test_the_lr_line_appears_only_for_another_global_batch_without_scaling():
    notes, _ = _notes("data.batch_size=64")
    assert notes == [
        "lr: global batch 64 != 1024 of the official recipe; model.optim.lr_scaling=linear would use "
        "ref_lr 6.25e-05, start_lr 1.25e-05"
    ]
    assert _notes("data.batch_size=64", world_size=16)[0] == []  # the official 64 x 16
    assert _notes("data.batch_size=256", "trainer.accumulate_grad_batches=4")[0][0].startswith("accumulate:")
    notes, summary = _notes("data.batch_size=64", "model.optim.lr_scaling=linear")
    assert notes == []
    # The summary shows the rates the run uses: 2e-4 and 1e-3 x 64/1024.
    assert "lr 1.25e-05 -> 6.25e-05 (2 warmup epochs) -> 1e-06" in summary
    assert "(lr_scaling=linear: x 64/1024)" in summary
    assert "lr 0.0002 -> 0.001 (2 warmup epochs)" in _notes("data.batch_size=64")[1]


def test_the_accumulation_line_appears_with_accumulation_only():
    notes, summary = _notes("data.batch_size=32", "trainer.accumulate_grad_batches=2", world_size=2)
    assert notes[1] == (
        "accumulate: trainer.accumulate_grad_batches=2: ME-MAX and Sinkhorn see each micro-batch of 64 "
        "images only, not the 128 of the accumulated step, so the regulariser differs from that of one "
        "batch of 128"
    )
    assert "batch    32 x 2 process(es) x 2 accumulated = 128 per step" in summary
    notes, _ = _notes("data.batch_size=32", "trainer.accumulate_grad_batches=1", world_size=2)
    assert not any(n.startswith("accumulate:") for n in notes)


def test_an_unknown_lr_scaling_lists_the_allowed_values_and_exits_2(tmp_path):
    with pytest.raises(
        ConfigError, match=r"model\.optim\.lr_scaling='sqrt' is unknown; allowed: none, linear"
    ):
        validate_config(composed("train", f"output_dir={tmp_path}", "model.optim.lr_scaling=sqrt"))
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}", "model.optim.lr_scaling=sqrt"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.optim.lr_scaling='sqrt' is unknown; allowed: none, linear" in proc.stderr
