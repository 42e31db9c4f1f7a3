"""A tiny MSNModule and a short Lightning fit, shared by the distributed, packed and speed tests."""

from __future__ import annotations

from typing import Any, TypeVar

import lightning as L
import torch
from torch.utils.data import DataLoader

from msn.module import MSNModule

M = TypeVar("M", bound=MSNModule)

# 16 px images, patch 4 (16 patches), one channel: a forward costs milliseconds.
TINY_ENCODER = {"arch": "vit_nano", "patch_size": 4, "img_size": 16, "in_chans": 1}


def tiny_module(cls: type[M] = MSNModule, **kw: Any) -> M:
    """``cls`` with a ViT-nano encoder, a 32-16 head, 10 prototypes, mask 0.3, seeded masks and init."""
    torch.manual_seed(0)
    kw = {"mask_ratio": 0.3, "mask_seed": 5, **kw}
    return cls(encoder=TINY_ENCODER, head={"hidden_dim": 32, "out_dim": 16}, num_prototypes=10, **kw)


def fit_steps(model: M, loader: DataLoader, steps: int, accelerator: str = "cpu", **trainer_kw: Any) -> M:
    """``steps`` optimizer steps of ``model`` on ``loader`` with a quiet Lightning Trainer."""
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=1,
        accelerator=accelerator,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kw,
    )
    trainer.fit(model, loader)
    return model
