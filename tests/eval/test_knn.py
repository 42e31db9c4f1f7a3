import math

import numpy as np
import pytest

from msn.eval.knn import knn_accuracy, knn_predict


def _brute_force(train_x, train_y, test_x, k, temperature):
    """Independent loop version: cosine similarity, k best, exp(s / T) votes."""
    preds = []
    for q in test_x:
        sims = []
        for x, y in zip(train_x, train_y):
            cos = float(np.dot(q, x) / (np.linalg.norm(q) * np.linalg.norm(x)))
            sims.append((cos, int(y)))
        sims.sort(key=lambda t: -t[0])
        votes = {}
        for cos, y in sims[:k]:
            votes[y] = votes.get(y, 0.0) + math.exp(cos / temperature)
        preds.append(max(votes, key=votes.get))
    return np.array(preds)


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.07), (5, 0.07), (20, 0.5)])
def test_matches_brute_force(k, temperature):
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(60, 8)), rng.normal(size=(25, 8))
    train_y = rng.integers(0, 4, size=60)
    got = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, batch_size=7)
    np.testing.assert_array_equal(got, _brute_force(train_x, train_y, test_x, k, temperature))


def test_weighted_votes_beat_majority():
    # two far neighbours of class 1 vs one very close neighbour of class 0: a sharp temperature
    # lets the close one win, a flat one lets the majority win
    train_x = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    train_y = np.array([0, 1, 1])
    query = np.array([[1.0, 0.05]])
    assert knn_predict(train_x, train_y, query, k=3, temperature=0.05)[0] == 0
    assert knn_predict(train_x, train_y, query, k=3, temperature=100.0)[0] == 1


def test_accuracy_and_bad_input():
    x = np.eye(3)
    assert knn_accuracy(x, np.arange(3), x, np.arange(3), k=1) == 100.0
    with pytest.raises(ValueError, match="k=4"):
        knn_predict(x, np.arange(3), x, k=4)
    with pytest.raises(ValueError, match="no labels"):
        knn_predict(x, -np.ones(3, dtype=int), x, k=1)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(x, np.arange(3), x, k=1, temperature=0)
