"""On-disk cache of extracted features, keyed by everything that determines them.

Extracting features of a large labelled set dominates repeated evaluations of one checkpoint
(another lambda, kNN after low-shot); the key covers the checkpoint file (path, size, mtime),
the data and its evaluation transform and the feature kind, so any change gives a new entry
instead of stale features.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


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
