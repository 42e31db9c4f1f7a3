"""Weighted k-nearest-neighbour classification of frozen features (the DINO protocol).

Features are L2-normalised; each test sample takes its ``k`` most cosine-similar training
samples, each voting for its label with weight ``exp(similarity / temperature)``.
"""

from __future__ import annotations

import numpy as np
import torch


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> np.ndarray:
    """Predicted labels (N_test,) for ``test_x`` (N_test, D) from the bank ``train_x`` (N, D).

    Test samples are processed in chunks of ``batch_size`` so the similarity matrix never holds
    more than ``batch_size x N`` entries.
    """
    if not 1 <= k <= len(train_x):
        raise ValueError(f"k={k} must be in [1, {len(train_x)}] (the number of training samples)")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"feature dims differ: train {train_x.shape[1]} vs test {test_x.shape[1]}")
    labels = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    if labels.min() < 0:
        raise ValueError("dataset has no labels; kNN evaluation needs a labelled training set")
    num_classes = int(labels.max()) + 1
    bank = torch.nn.functional.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1)
    preds = []
    for start in range(0, len(test_x), batch_size):
        query = torch.as_tensor(test_x[start : start + batch_size], dtype=torch.float32)
        sims = torch.nn.functional.normalize(query, dim=1) @ bank.T  # (b, N)
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes)
        votes.scatter_add_(1, labels[top_idx], (top_sims / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds).numpy()


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy (percent) of :func:`knn_predict` on ``(test_x, test_y)``."""
    pred = knn_predict(train_x, train_y, test_x, k, temperature)
    return float(100.0 * np.mean(pred == np.asarray(test_y)))
