"""Embed every image of a folder (``python -m msn.cli.extract`` / ``msn-extract``).

``python -m msn.cli.extract ckpt=PATH input=FOLDER out=features.npy`` walks ``FOLDER`` recursively,
runs the checkpoint's target encoder on every image file in batches (evaluation transform at the
encoder's resolution, no augmentation) and writes:

- ``features.npy``: ``float32`` array ``(N, D)``, one row per readable image;
- ``features.csv``: ``index,path``, the file of each row (sorted path order);
- ``features.unreadable.csv``: ``path,error`` for files with an image extension that do not
  decode (only when there are some). They are skipped, not fatal.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from msn.backbone import extract, features_problems
from msn.checks import ConfigError
from msn.cli.common import hydra_entry, resolve_device
from msn.data.decode import BadImageError, load_image
from msn.data.folders import IMAGE_EXTENSIONS, list_images
from msn.data.transforms import eval_transform, image_mode
from msn.io import build_encoder, data_stats, encoder_problems, read_checkpoint


class ImageFiles(Dataset):
    """``(image tensor, index, error)`` for a list of files; an unreadable file gives a zero image
    and its error message (the batch goes on; the caller drops that row)."""

    def __init__(
        self, files: Sequence[Path], transform: Callable[[Image.Image], Tensor], shape: tuple
    ) -> None:
        self.files = list(files)
        self.transform = transform
        self.shape = shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str]:
        try:
            img = load_image(os.fspath(self.files[index]), image_mode(self.shape[0]))
        except BadImageError as err:
            return torch.zeros(self.shape), index, str(err).removeprefix(f"{self.files[index]}: ")
        return self.transform(img), index, ""


@torch.no_grad()
def embed_files(
    encode: Callable[[Tensor], Tensor],
    dataset: ImageFiles,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Run ``encode`` over every file of ``dataset``, in order.

    Returns:
        ``(features, kept, unreadable)``: ``float32`` ``(N, D)`` for the readable files, their
        indices into ``dataset.files`` (``N``), and ``(index, error)`` of the others.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats: list[np.ndarray] = []
    kept: list[int] = []
    bad: list[tuple[int, str]] = []
    for images, index, errors in tqdm(loader, desc="extract", unit="batch", disable=not progress):
        ok = torch.tensor([not e for e in errors], dtype=torch.bool)
        bad += [(int(i), e) for i, e in zip(index, errors) if e]
        if ok.any():
            feats.append(encode(images[ok].to(device)).float().cpu().numpy())
            kept += index[ok].tolist()
    if not feats:
        return np.zeros((0, 0), dtype=np.float32), kept, bad
    return np.concatenate(feats), kept, bad


def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """``(features.npy, features.csv, features.unreadable.csv)`` for ``out`` (``.npy`` added if missing)."""
    npy = Path(out).expanduser()
    if npy.suffix != ".npy":
        npy = npy.with_name(npy.name + ".npy")
    stem = npy.with_suffix("")
    return npy, stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".unreadable.csv")


def run_extract(cfg: DictConfig) -> dict[str, Any]:
    """Run ``msn.cli.extract`` for a composed ``configs/extract.yaml``; returns paths and counts."""
    problems = []
    folder = Path(str(cfg.input)).expanduser()
    if not folder.is_dir():
        problems.append(f"input={str(cfg.input)!r} is not an existing folder")
    problems += features_problems(cfg.features)
    problems += encoder_problems(cfg.encoder)
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        problems.append(f"batch_size={cfg.batch_size} must be an integer >= 1")
    if problems:
        raise ConfigError(problems)
    files = [Path(p) for p in list_images(os.fspath(folder))]
    if not files:
        raise ValueError(
            f"no image files under {str(folder)!r} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    device = resolve_device(cfg.device)
    ckpt = read_checkpoint(cfg.ckpt, num_heads=cfg.num_heads)
    vit = build_encoder(ckpt, cfg.encoder, img_size=cfg.img_size, strict=cfg.strict).to(device)
    mean, std = data_stats(ckpt, cfg.mean, cfg.std)
    size = int(vit.patch_embed.img_size[0])
    in_chans = vit.patch_embed.proj.in_channels
    transform = eval_transform(size, in_chans, mean, std, cfg.crop_pct, cfg.interpolation)
    dataset = ImageFiles(files, transform, (in_chans, size, size))

    feats, kept, bad = embed_files(
        lambda x: extract(vit, x, cfg.features), dataset, cfg.batch_size, cfg.num_workers, device
    )
    if not kept:  # nothing to write: an empty array would pass for a result
        listed = "; ".join(f"{files[i]}: {err}" for i, err in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(
            f"none of the {len(files)} image files under {str(folder)!r} decodes ({listed}{more})"
        )
    npy, csv_path, bad_path = output_paths(cfg.out)
    npy.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, feats)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "path"])
        writer.writerows((row, str(files[i])) for row, i in enumerate(kept))
    result = {"features": str(npy), "paths": str(csv_path), "images": len(kept), "unreadable": len(bad)}
    print(f"{len(kept)} images -> {npy} {tuple(feats.shape)}, paths in {csv_path}", flush=True)
    if bad:
        with open(bad_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "error"])
            writer.writerows((str(files[i]), err) for i, err in bad)
        result["unreadable_list"] = str(bad_path)
        print(
            f"{len(bad)} unreadable image file(s) skipped, listed in {bad_path}", file=sys.stderr, flush=True
        )
    return result


def main() -> None:
    """Console-script entry (``msn-extract``); same as ``python -m msn.cli.extract``."""
    hydra_entry("extract", run_extract)()


if __name__ == "__main__":
    main()
