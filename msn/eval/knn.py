"""Weighted k-nearest-neighbour classification of frozen features (the DINO protocol).

Features are L2-normalised; each test sample takes its ``k`` most cosine-similar training
samples, each voting for its label with weight ``exp(similarity / temperature)``.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from msn.eval.features import frozen_features
from msn.eval.reports import EvalRun, Evaluation


def knn_problems(k: Any, temperature: Any, n_train: int | None = None, prefix: str = "") -> list[str]:
    """What is wrong with ``k`` and ``temperature`` (``n_train``: the size of the bank, when known);
    ``prefix`` names their config node in the messages."""
    problems = []
    is_int = isinstance(k, numbers.Integral) and not isinstance(k, bool)
    if n_train is None and not (is_int and k >= 1):
        problems.append(f"{prefix}k={k} must be an integer >= 1")
    elif n_train is not None and not (is_int and 1 <= k <= n_train):
        problems.append(f"{prefix}k={k} must be in [1, {n_train}] (the number of training samples)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
        problems.append(f"{prefix}temperature={temperature} must be > 0")
    return problems


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
    problems = knn_problems(k, temperature, len(train_x))
    if problems:
        raise ValueError(problems[0])
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


@dataclass
class KnnEvaluation(Evaluation):
    """Weighted kNN accuracy of the run's frozen features on all labelled training images
    (``configs/eval/knn.yaml``); writes ``knn.json``.

    Args:
        k: neighbours that vote.
        temperature: votes are weighted by ``exp(similarity / temperature)``.
        batch_size: batch of the feature extraction.
    """

    k: int
    temperature: float
    batch_size: int

    def problems(self) -> list[str]:
        return knn_problems(self.k, self.temperature, prefix="knn.")

    def __call__(self, run: EvalRun) -> str:
        train_x, train_y, test_x, test_y = frozen_features(
            run.model, run.train_ds, run.test_ds, self.batch_size, cache=run.cache
        )
        acc = knn_accuracy(train_x, train_y, test_x, test_y, self.k, self.temperature)
        run.output_dir.mkdir(parents=True, exist_ok=True)
        payload = {"accuracy": acc, "k": self.k, "temperature": self.temperature, "train": len(train_y)}
        (run.output_dir / "knn.json").write_text(json.dumps(payload, indent=2))
        return (
            f"kNN accuracy, {run.dataset}: {acc:.1f} % (k={self.k}, temperature {self.temperature}, "
            f"{len(train_y)} labelled train images, {len(test_y)} test images)"
        )
