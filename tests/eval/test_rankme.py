"""RankMe against an independent formula and its defining cases."""

import numpy as np
import pytest
import torch

from msn.eval.rankme import EPS, effective_rank


def rankme_by_eigenvalues(z: np.ndarray) -> float:
    """The same quantity another way: singular values as square roots of the eigenvalues of the
    Gram matrix Z^T Z (float64), the entropy written out as a sum."""
    eig = np.clip(np.linalg.eigvalsh(z.T.astype(np.float64) @ z.astype(np.float64)), 0, None)
    s = np.sqrt(eig)[::-1][: min(z.shape)]
    p = s / s.sum() + EPS
    return float(np.exp(-sum(pk * np.log(pk) for pk in p)))


@pytest.mark.parametrize("shape", [(200, 16), (30, 64), (500, 5)])
def test_matches_the_gram_matrix_formula(shape):
    rng = np.random.default_rng(0)
    # Uneven spectrum: columns of very different scales.
    z = rng.normal(size=shape) * np.geomspace(1, 1e-2, shape[1])
    assert effective_rank(z) == pytest.approx(rankme_by_eigenvalues(z), rel=1e-6)
    assert effective_rank(torch.from_numpy(z).float()) == pytest.approx(rankme_by_eigenvalues(z), rel=1e-4)


def test_equal_singular_values_give_their_number_and_collapse_gives_one():
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(100, 100)))
    for r in (1, 3, 10):
        # r orthonormal directions, equal weight: rank r exactly (up to the eps).
        z = q[:, :r] @ np.eye(r, 40) * 5.0
        assert effective_rank(z) == pytest.approx(r, rel=1e-4)
    constant = np.tile(np.arange(1.0, 9.0), (50, 1))  # every image the same embedding
    assert effective_rank(constant) == pytest.approx(1.0, rel=1e-4)
    assert effective_rank(np.zeros((4, 3))) == 0.0


def test_invariant_to_rotation_and_scale():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(80, 12))
    rot, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert effective_rank(z @ rot * 7.0) == pytest.approx(effective_rank(z), rel=1e-9)


def test_bad_shapes_are_rejected():
    for bad in (np.zeros(5), np.zeros((0, 4)), np.zeros((2, 3, 4))):
        with pytest.raises(ValueError, match="non-empty \\(N, D\\) matrix"):
            effective_rank(bad)
