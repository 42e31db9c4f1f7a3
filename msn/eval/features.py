"""Frozen features of an encoder, and their on-disk cache.

:func:`extract_features` runs any encoder over a labelled dataset in order; :func:`frozen_features`
does it for a model's train and test sets through :class:`FeatureCache`.

Extracting features of a large labelled set dominates repeated evaluations of one checkpoint
(another lambda, kNN after low-shot); the cache key covers the checkpoint file (path, size, mtime),
the data and its evaluation transform and the feature kind, so any change gives a new entry
instead of stale features.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Identity of a file's current content without reading it: absolute path, size, mtime."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class FeatureCache:
    """Arrays stored as ``<root>/<sha256 of fingerprint + name>.npz``.

    Args:
        root: cache folder (created on first save).
        fingerprint: JSON-serialisable description of what determines the features.
    """

    def __init__(self, root: str | Path, fingerprint: dict[str, Any]) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint

    def path(self, name: str) -> Path:
        blob = json.dumps({"fingerprint": self.fingerprint, "name": name}, sort_keys=True, default=str)
        return self.root / f"{hashlib.sha256(blob.encode()).hexdigest()[:32]}.npz"

    def load(self, name: str) -> dict[str, np.ndarray] | None:
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError):  # a truncated entry is a miss, not a crash
            return None

    def save(self, name: str, **arrays: np.ndarray) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(name)
        # Write then rename, so an interrupted save never leaves a half-written entry behind.
        tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``encode`` over a dataset of ``(image, label)`` pairs, in dataset order.

    Args:
        encode: maps a batch of images ``(B, ...)`` on ``device`` to features ``(B, D)``. If it
            wraps an ``nn.Module``, the caller must put that module in ``eval()`` mode first;
            this function only disables autograd.
        dataset: map-style dataset whose items are ``(image_tensor, label)`` (extra trailing
            items are ignored). Labels are returned as they are, ``-1`` included: the low-shot
            functions reject unlabelled data, but extracting features of it is not an error.
        batch_size: images per forward pass.
        num_workers: ``DataLoader`` worker processes.
        device: where ``encode`` runs; images are moved there, features come back to the CPU.
        progress: show a tqdm progress bar.
        desc: label of the progress bar.

    Returns:
        ``(features, labels)``: ``float32`` array ``(N, D)`` and ``int64`` array ``(N,)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("cannot extract features of an empty dataset")
    device = torch.device(device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,  # features must stay aligned with dataset indices
        drop_last=False,  # every sample is evaluated
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    feats: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise TypeError("dataset items must be (image, label) pairs")
        images, targets = batch[0], batch[1]
        out = encode(images.to(device, non_blocking=True))
        if out.ndim != 2 or out.shape[0] != images.shape[0]:
            raise ValueError(
                f"encode must return a (batch, dim) tensor, got shape {tuple(out.shape)} "
                f"for a batch of {images.shape[0]} images"
            )
        # float32 on the CPU: half-precision features (autocast) would lose accuracy in the
        # centring/normalisation, and float64 would double the memory of large feature banks.
        feats.append(out.detach().float().cpu().numpy())
        labels.append(torch.as_tensor(targets).long().reshape(-1).cpu().numpy())
    return np.concatenate(feats, axis=0), np.concatenate(labels, axis=0)


def raw_pixel_features(
    dataset: Dataset,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Flattened image tensors as features: the raw-pixel baseline of the low-shot table.

    The images are whatever the dataset's transform yields (so a 224x224 RGB eval transform gives
    150528-dim features; use a small resolution for this baseline).

    Returns:
        ``(features, labels)``: ``float32`` array ``(N, C*H*W)`` and ``int64`` array ``(N,)``.
    """
    return extract_features(
        lambda x: x.flatten(1),
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        device="cpu",
        progress=progress,
        desc="raw pixels",
    )


def untrained_copy(model: Any, seed: int) -> Any:
    """The same architecture with a fresh random initialisation (the random-init baseline)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return type(model)(**model.hparams).to(model.device)


def frozen_features(
    model: Any,
    train_ds: Dataset,
    test_ds: Dataset,
    batch_size: int,
    label: str = "features",
    cache: FeatureCache | None = None,
    cache_name: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, test_x, test_y)``: ``model.features`` of both sets, in eval mode.

    With a ``cache``, features are read from it when present and written after extraction, under
    ``cache_name`` (default ``label``).
    """
    names = ("train_x", "train_y", "test_x", "test_y")
    key = cache_name or label
    if cache is not None and (hit := cache.load(key)) is not None and set(hit) == set(names):
        return tuple(hit[n] for n in names)  # type: ignore[return-value]
    model.eval()
    kw = {"batch_size": batch_size, "device": model.device}
    train_x, train_y = extract_features(model.features, train_ds, desc=f"{label} (train)", **kw)
    test_x, test_y = extract_features(model.features, test_ds, desc=f"{label} (test)", **kw)
    if cache is not None:
        cache.save(key, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    return train_x, train_y, test_x, test_y
