"""Fixtures shared across the test folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from msn.module import MSNModule
from tests.artefacts import msn_module, save_lightning


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MSNModule]:
    """``(path, model)``: a tiny pre-training checkpoint as train.py writes it (read-only: shared)."""
    model = msn_module(seed=20)
    return save_lightning(model, tmp_path_factory.mktemp("pretrained") / "last.ckpt"), model


@pytest.fixture(scope="session", autouse=True)
def _cache_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches (the image-folder file lists) go to a temporary folder, not the user's home; the
    train.py processes that tests start inherit it."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.cuda`` tests skip without a GPU, except under ``MSN_REQUIRE_CUDA=1`` (the GPU
    check), where a missing GPU must fail them rather than let them pass by skipping."""
    if torch.cuda.is_available() or os.environ.get("MSN_REQUIRE_CUDA") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs these)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
