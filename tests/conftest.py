"""Fixtures shared across the test folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from msn.module import MSNModule
from tests.artefacts import msn_module, save_lightning


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MSNModule]:
    """``(path, model)``: a tiny pre-training checkpoint as train.py writes it (read-only: shared)."""
    model = msn_module(seed=20)
    return save_lightning(model, tmp_path_factory.mktemp("pretrained") / "last.ckpt"), model
