"""What many tests share: the tiny model and a short fit, composed configs, the settings of a
2-step end-to-end run, and a folder of troublesome image files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader

from msn.cli.common import CONFIG_DIR
from msn.data import MSNDataModule
from msn.module import MSNModule

M = TypeVar("M", bound=MSNModule)

# 16 px images, patch 4 (16 patches), one channel: a forward costs milliseconds.
TINY_ENCODER = {"arch": "vit_nano", "patch_size": 4, "img_size": 16, "in_chans": 1}


def tiny_module(cls: type[M] = MSNModule, seed: int = 0, **kw: Any) -> M:
    """``cls`` with a ViT-nano encoder on 16 px grey images, a 32-16 head, 10 prototypes, mask 0.3
    and seeded masks, initialised from ``seed``; any of these (or other arguments) set by ``kw``."""
    torch.manual_seed(seed)
    kw = {
        "encoder": TINY_ENCODER,
        "head": {"hidden_dim": 32, "out_dim": 16},
        "num_prototypes": 10,
        "mask_ratio": 0.3,
        "mask_seed": 5,
        **kw,
    }
    return cls(**kw)


def fit_steps(
    model: M,
    data: DataLoader | L.LightningDataModule,
    steps: int,
    accelerator: str = "cpu",
    **trainer_kw: Any,
) -> M:
    """``steps`` optimizer steps of ``model`` on ``data`` (a loader or a data module), quietly."""
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
    if isinstance(data, L.LightningDataModule):
        trainer.fit(model, datamodule=data)
    else:
        trainer.fit(model, data)
    return model


def record_views(dm: MSNDataModule) -> list[list[tuple[tuple[int, ...], str]]]:
    """Wraps ``dm.on_after_batch_transfer``; the list returned gets, per training batch, the
    ``(shape, device type)`` of every view that the hook made."""
    seen: list[list[tuple[tuple[int, ...], str]]] = []
    original = dm.on_after_batch_transfer

    def recording(batch: object, idx: int) -> object:
        out = original(batch, idx)
        if out is not batch:  # the views were made (training batches with augment_on=device)
            seen.append([(tuple(v.shape), v.device.type) for v in out[0]])  # type: ignore[index]
        return out

    dm.on_after_batch_transfer = recording  # type: ignore[method-assign]
    return seen


def device_views_data(name: str, root: Path, log_dir: Path, decode_on: str, batch_size: int) -> MSNDataModule:
    """Encoded images of ``name`` at ``root`` for :func:`tiny_module`: 16 px grey views made on the
    device (one focal view), decoded per ``decode_on``, bad images listed in ``log_dir``."""
    return MSNDataModule(
        name=name,
        root=str(root),
        in_chans=1,
        batch_size=batch_size,
        augment_on="device",
        decode_on=decode_on,
        load_size=16,
        transform={"rand_size": 16, "focal_size": 8, "focal_views": 1},
        bad_image_log=log_dir / f"bad_{decode_on}.txt",
    )


def composed(config_name: str, *overrides: str, hydra: bool = False) -> DictConfig:
    """``configs/<config_name>.yaml`` composed with ``overrides`` (and Hydra's own node with ``hydra``)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra)


# The tiny settings of the end-to-end runs of train.py.
FAST = [
    "trainer.max_steps=2",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "data.batch_size=16",
    "model.head.hidden_dim=64",
    "model.num_prototypes=32",
    "lowshot.shots=[1]",
    "lowshot.seeds=[0]",
    "report.enabled=false",
]


# Files that do not decode, by name, with a word of the reason each gives.
UNREADABLE = {"truncated.jpg": "truncated", "corrupt.png": "", "empty.jpg": "empty", "notes.png": "identify"}


def bad_image_folder(root: Path) -> Path:
    """Good images plus one file of every troublesome kind, in one flat folder (sorted names)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / f"good{i}.png")
    buffer = root / "tmp.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, quality=95)
    data = buffer.read_bytes()
    buffer.unlink()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png = root / "tmp.png"
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(png)
    raw = png.read_bytes()
    png.unlink()
    (root / "corrupt.png").write_bytes(raw[:40] + bytes(rng.integers(0, 256, 200, dtype=np.uint8)))
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("not an image at all")
    # Readable, but not RGB: converted.
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(root / "mode_cmyk.jpg")
    Image.fromarray(np.full((12, 12), 40000, dtype=np.uint16)).save(root / "mode_16bit.png")
    palette = Image.fromarray(rng.integers(0, 4, (12, 12), dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.info["transparency"] = 0
    palette.save(root / "mode_palette.png")
    Image.fromarray(np.full((12, 12), 77, dtype=np.uint8), mode="L").save(root / "mode_gray.png")
    return root
