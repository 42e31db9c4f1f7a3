"""The embedding map: which method ``auto`` picks, and that a map keeps separated clusters apart."""

import importlib.util

import numpy as np
import pytest

from msn.report import embedding
from msn.report.embedding import embed_2d, plot_embedding, resolve_method


def _clusters(n_per: int = 20, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, dim)) * 5
    labels = np.repeat(np.arange(3), n_per)
    return centres[labels] + rng.normal(size=(3 * n_per, dim)) * 0.3, labels


def _neighbour_purity(points: np.ndarray, labels: np.ndarray) -> float:
    d = ((points[:, None] - points[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((labels[d.argmin(axis=1)] == labels).mean())


def test_auto_is_umap_exactly_when_umap_learn_imports(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        embedding.importlib.util, "find_spec", lambda name: None if name == "umap" else real(name)
    )
    assert resolve_method("auto") == "tsne"
    with pytest.raises(
        ValueError, match=r"embedding='umap' needs umap-learn: pip install 'msn-lightning\[report\]'"
    ):
        resolve_method("umap")
    monkeypatch.setattr(
        embedding.importlib.util, "find_spec", lambda name: object() if name == "umap" else real(name)
    )
    assert resolve_method("auto") == "umap"
    with pytest.raises(ValueError, match="embedding='pca' is unknown"):
        resolve_method("pca")


def test_tsne_keeps_clusters_apart_and_names_its_parameters(tmp_path):
    x, labels = _clusters()
    points, how = embed_2d(x, "tsne", seed=0)
    assert points.shape == (60, 2)
    assert how == "t-SNE (perplexity 19.6667, PCA init; centred, L2-normalised, PCA to 50)"
    assert _neighbour_purity(points, labels) == 1.0
    again, _ = embed_2d(x, "tsne", seed=0)
    np.testing.assert_array_equal(points, again)
    plot_embedding(points, labels, tmp_path / "a.png", title="t", classes=["a", "b", "c"])
    plot_embedding(points, None, tmp_path / "b.png", title="t")
    assert all((tmp_path / f).read_bytes().startswith(b"\x89PNG") for f in ("a.png", "b.png"))
    with pytest.raises(ValueError, match="at least 4 images"):
        embed_2d(x[:3], "tsne")


def test_umap_keeps_clusters_apart():
    pytest.importorskip("umap", reason="umap-learn not installed (the optional extra msn-lightning[report])")
    x, labels = _clusters()
    points, how = embed_2d(x, "umap", seed=0)
    assert points.shape == (60, 2) and how.startswith("UMAP (n_neighbors 15, min_dist 0.1;")
    assert _neighbour_purity(points, labels) == 1.0
