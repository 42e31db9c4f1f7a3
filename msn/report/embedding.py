"""A 2-D map of frozen features (``embedding.png``): UMAP when ``umap-learn`` is installed (the
``report`` extra), else scikit-learn's t-SNE, on the features as low-shot evaluation sees them
(centred, L2-normalised)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from msn.report.figure import pyplot, save

EMBEDDING_METHODS = ("auto", "umap", "tsne")
#: Dimensions kept by the PCA in front of t-SNE / UMAP (the usual speed-up; most variance stays).
PCA_DIMS = 50


def resolve_method(method: str) -> str:
    """``umap`` or ``tsne``: ``auto`` is UMAP when ``umap-learn`` can be imported."""
    if method not in EMBEDDING_METHODS:
        raise ValueError(f"embedding={method!r} is unknown; allowed: {', '.join(EMBEDDING_METHODS)}")
    if method == "auto":
        return "umap" if importlib.util.find_spec("umap") is not None else "tsne"
    if method == "umap" and importlib.util.find_spec("umap") is None:
        raise ValueError("embedding='umap' needs umap-learn: pip install 'msn-lightning[report]'")
    return method


def embed_2d(features: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """``(points (N, 2), description)`` of ``features`` (N, D); the description names the method
    and its parameters, for the figure's title."""
    from sklearn.decomposition import PCA

    method = resolve_method(method)
    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"an embedding map needs at least 4 images, got {n}")
    x = x - x.mean(axis=0)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    dims = min(PCA_DIMS, x.shape[1], n)
    steps = "centred, L2-normalised"
    if dims < x.shape[1]:
        x = PCA(n_components=dims, random_state=seed).fit_transform(x)
        steps += f", PCA to {dims}"
    if method == "umap":
        import umap

        neighbours = min(15, n - 1)
        points = umap.UMAP(n_neighbors=neighbours, min_dist=0.1, random_state=seed).fit_transform(x)
        return np.asarray(points), f"UMAP (n_neighbors {neighbours}, min_dist 0.1; {steps})"
    from sklearn.manifold import TSNE

    perplexity = float(min(30, (n - 1) / 3))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return points, f"t-SNE (perplexity {perplexity:g}, PCA init; {steps})"


def plot_embedding(
    points: np.ndarray,
    labels: np.ndarray | None,
    path: Path,
    *,
    title: str,
    classes: Sequence[str] | None = None,
) -> Path:
    """``embedding.png``: the 2-D points, one colour per label (a legend of class names when
    ``classes`` names them), one colour for all without labels."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=120)
    size = max(2.0, min(12.0, 12000 / len(points)))
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=size, c="tab:blue", alpha=0.6, linewidths=0)
        ax.text(0.01, 0.01, "no labels: one colour", transform=ax.transAxes, fontsize=8)
    else:
        values = np.unique(labels)
        cmap = plt.get_cmap("tab10" if len(values) <= 10 else "tab20")
        for i, value in enumerate(values):
            sel = labels == value
            name = (
                classes[int(value)] if classes is not None and 0 <= int(value) < len(classes) else str(value)
            )
            ax.scatter(
                points[sel, 0],
                points[sel, 1],
                s=size,
                color=cmap(i % cmap.N),
                alpha=0.7,
                linewidths=0,
                label=name,
            )
        if len(values) <= 20:
            ax.legend(
                fontsize=7, markerscale=max(1.0, 6 / size), loc="center left", bbox_to_anchor=(1.0, 0.5)
            )
    ax.set_xlabel("map axis 1 (no unit)")
    ax.set_ylabel("map axis 2 (no unit)")
    ax.set_title(title, fontsize=8)
    return save(fig, path)
