"""A resumed train.py run continues the wandb run of its checkpoint (offline, no account needed)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from msn.cli.train import build_loggers, train
from msn.training.loggers import LOGGERS_KEY, WANDB_RUN_ID, recorded_logger_ids
from tests.helpers import FAST, composed


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """wandb logging offline into ``tmp_path`` (no account, nothing written outside it)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        (tmp_path / key.lower()).mkdir()
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    # Also restores the WANDB_MODE that Lightning's WandbLogger(offline=True) sets for good.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield wandb
    wandb.finish()


def _train(wandb: Any, run_dir: Path, *overrides: str) -> dict[str, Any]:
    """train() in this process (one import for the three runs), then the wandb run ends, as it
    does when train.py exits: a later run in this process must not reuse it."""
    cfg = composed(
        "train", *FAST, "lowshot.enabled=false", "logger=wandb", f"output_dir={run_dir}", *overrides
    )
    try:
        return train(cfg)
    finally:
        wandb.finish()


def _run_ids(run_dir: Path) -> list[str]:
    """The run id of every offline run folder (``offline-run-<time>-<id>``)."""
    return [p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")]


def _stored_id(run_dir: Path) -> str:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt[LOGGERS_KEY][WANDB_RUN_ID]


@pytest.mark.slow
def test_a_resume_continues_the_wandb_run_and_a_new_run_starts_its_own(offline_wandb, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="msn")
    run = tmp_path / "run"
    _train(offline_wandb, run)
    (first,) = _run_ids(run)
    assert _stored_id(run) == first

    # ckpt_path=last (a SLURM requeue resolves to the same): the same run id, logging on.
    _train(offline_wandb, run, "ckpt_path=last", "trainer.max_steps=3", "trainer.max_epochs=2")
    assert f"wandb: continuing run {first} of the resumed checkpoint" in caplog.text
    assert _run_ids(run) == [first, first]  # a second folder of the same run
    assert _stored_id(run) == first
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3

    # Without ckpt_path the same folder, checkpoint and all, starts a new wandb run.
    _train(offline_wandb, run)
    ids = _run_ids(run)
    (new,) = set(ids) - {first}
    assert sorted(ids) == sorted([first, first, new]) and _stored_id(run) == new


def test_the_resumed_checkpoint_id_goes_to_the_wandb_logger_unless_the_config_names_one(tmp_path):
    cfg = composed("train", "logger=wandb", f"output_dir={tmp_path}")
    (logger,) = build_loggers(cfg, "abc123")
    assert logger._wandb_init["id"] == "abc123" and logger._wandb_init["resume"] == "allow"
    (logger,) = build_loggers(cfg)
    assert logger._wandb_init["id"] is None  # wandb draws a new one
    cfg = composed("train", "logger=wandb", f"output_dir={tmp_path}", "logger.wandb.id=mine")
    (logger,) = build_loggers(cfg, "abc123")
    assert logger._wandb_init["id"] == "mine"


def test_recorded_logger_ids_of_a_checkpoint_without_them_is_empty(tmp_path):
    torch.save({"global_step": 3}, tmp_path / "old.ckpt")
    assert recorded_logger_ids(tmp_path / "old.ckpt") == {}
    torch.save({LOGGERS_KEY: {WANDB_RUN_ID: "x1"}}, tmp_path / "new.ckpt")
    assert recorded_logger_ids(tmp_path / "new.ckpt") == {WANDB_RUN_ID: "x1"}


def test_report_images_go_to_wandb(offline_wandb, tmp_path):
    from lightning.pytorch.loggers import WandbLogger
    from PIL import Image

    from msn.report import log_report_images

    report = tmp_path / "report"
    report.mkdir()
    Image.new("RGB", (30, 20), (10, 200, 10)).save(report / "attention.png")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path / "run"), project="msn")
    assert log_report_images([logger], report, step=3) == ["wandb"]
    offline_wandb.finish()
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    media = list((run_dir / "files" / "media" / "images" / "report").glob("attention_*.png"))
    assert len(media) == 1
    with Image.open(media[0]) as image:
        assert image.size == (30, 20)
