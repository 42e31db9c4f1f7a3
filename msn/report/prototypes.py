"""How the prototypes are used (``prototypes.png``): how many images pick each one as the target
network's most likely prototype, and how alike the prototypes are (pairwise cosine similarity)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from msn.report.figure import pyplot, save


def prototype_usage(assigned: np.ndarray, num_prototypes: int) -> np.ndarray:
    """(K,) counts: images whose argmax prototype is each one (``assigned``: (N,) indices)."""
    return np.bincount(np.asarray(assigned, dtype=np.int64).ravel(), minlength=num_prototypes)


def prototype_similarity(prototypes: Tensor) -> np.ndarray:
    """(K, K) cosine similarities of the prototypes (float64)."""
    p = torch.nn.functional.normalize(prototypes.detach().to(torch.float64).cpu(), dim=1)
    return (p @ p.T).numpy()


def plot_prototypes(counts: np.ndarray, similarity: np.ndarray, path: Path, *, title: str) -> Path:
    """Three panels: usage sorted high to low; the similarity matrix with the prototypes in that
    order; the histogram of the off-diagonal similarities (pairs of used prototypes apart)."""
    plt = pyplot()

    k = len(counts)
    order = np.argsort(-counts, kind="stable")
    used = int((counts > 0).sum())
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    ax = axes[0]
    ax.bar(np.arange(k), counts[order], width=1.0, color="tab:blue")
    ax.axvline(used - 0.5, color="tab:red", lw=1, ls="--", label=f"{used} of {k} in use")
    ax.set_xlabel("prototype, sorted by use")
    ax.set_ylabel("images assigned (argmax of the target)")
    ax.set_title(f"usage over {int(counts.sum()):,} images", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1]
    im = ax.imshow(
        similarity[np.ix_(order, order)], cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest"
    )
    ax.set_xlabel("prototype, sorted by use")
    ax.set_ylabel("prototype, sorted by use")
    ax.set_title("pairwise cosine similarity", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046).set_label("cosine similarity")
    ax = axes[2]
    off = ~np.eye(k, dtype=bool)
    is_used = counts > 0
    both = off & is_used[:, None] & is_used[None, :]
    bins = np.linspace(-1, 1, 81)
    ax.hist(similarity[off], bins=bins, color="tab:gray", alpha=0.7, label="all pairs")
    if both.any():
        ax.hist(similarity[both], bins=bins, color="tab:orange", alpha=0.8, label="pairs of used ones")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("prototype pairs")
    ax.set_yscale("log")
    ax.set_title("off-diagonal similarities", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save(fig, path)
