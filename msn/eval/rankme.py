"""RankMe (Garrido et al., 2023): the effective rank of a set of embeddings, a collapse signal that
needs no labels. A full-rank, spread representation of D dimensions scores near min(N, D); one that
has collapsed onto a few directions scores near their number, and a constant one scores 1.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: Added to every normalised singular value before the entropy, so zero values are finite (the
#: paper's epsilon).
EPS = 1e-7


def effective_rank(features: Tensor | np.ndarray, eps: float = EPS) -> float:
    """``exp(H(p))`` with ``p_k = s_k / sum(s) + eps``, ``s`` the singular values of ``features``.

    Args:
        features: (N, D) embeddings, one row per image, as they are (not centred: the paper's
            definition); computed in float64.
        eps: the small constant of the entropy.

    Returns:
        A number in [1, min(N, D)] (up to ``eps``); 0 for an all-zero matrix.
    """
    z = torch.as_tensor(np.asarray(features) if not isinstance(features, Tensor) else features)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"features must be a non-empty (N, D) matrix, got shape {tuple(z.shape)}")
    s = torch.linalg.svdvals(z.detach().to(torch.float64).cpu())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))
