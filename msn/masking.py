"""Random patch masking (MSN's "random masking" of the anchor view), as pure tensor functions.

MSN drops patch tokens after the position embedding was added, so kept tokens still know where
they came from; the class token is always kept. The number of kept patches is static,
``floor(N * (1 - ratio))``, so every batch has the same shape (friendly to torch.compile and to
batching views of one size together).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

MASK_MODES = ("shared", "per_sample")


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches kept of ``num_patches`` at ``mask_ratio`` in [0, 1): ``floor(N * (1 - r))``, at least 1."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} must be in [0, 1)")
    # Same float expression as the official code so keep counts agree exactly; at least one patch
    # survives so a tiny focal grid with a high ratio still has content.
    return max(1, math.floor(num_patches * (1.0 - mask_ratio)))


def sample_keep_indices(
    batch_size: int,
    num_patches: int,
    keep: int,
    mode: str = "shared",
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices (into the patch tokens, 0-based) of the patches to keep.

    Returns:
        (keep,) for ``mode="shared"`` (one random subset for the whole batch, the official
        behaviour) or (B, keep) for ``mode="per_sample"`` (an independent subset per image).
        Indices are sorted so kept tokens stay in raster order.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask_mode={mode!r} is unknown; allowed: {', '.join(MASK_MODES)}")
    if not 1 <= keep <= num_patches:
        raise ValueError(f"keep={keep} must be in [1, {num_patches}]")
    if mode == "shared":
        perm = torch.randperm(num_patches, device=device, generator=generator)
        return perm[:keep].sort().values
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def apply_keep_indices(tokens: Tensor, keep_idx: Tensor) -> Tensor:
    """Keep the class token (position 0) and the patch tokens at ``keep_idx``.

    Args:
        tokens: (B, 1 + N, D), class token first.
        keep_idx: (K,) shared or (B, K) per-sample indices into the N patch tokens.

    Returns:
        (B, 1 + K, D).
    """
    cls, patches = tokens[:, :1], tokens[:, 1:]
    if keep_idx.dim() == 1:
        kept = patches.index_select(1, keep_idx)
    else:
        kept = patches.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    return torch.cat([cls, kept], dim=1)


def _mask_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (nearby keys give unrelated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seeded_keep_indices(
    seed: int,
    key: Sequence[int],
    views: int,
    batch_size: int,
    num_patches: int,
    keep: int,
    mode: str = "shared",
    rank: int = 0,
    world_size: int = 1,
) -> Tensor:
    """Keep indices as a pure function of ``(seed, key)`` (and ``rank``): no global random state.

    ``key`` names the draw (e.g. ``(step, batch_idx, group)``), so a resumed run draws the very same
    masks, and ranks can be told apart without seeding them differently.

    - ``shared``: one subset for the whole group of ``views * batch_size`` images of every rank,
      drawn from ``(seed, key)``: all ranks drop the same patches, as in the official code, where
      every process seeds its random state alike and so draws the same permutation. Returns (keep,).
    - ``per_sample``: one subset per image, drawn for the *global* batch from ``(seed, key)`` and
      sliced for this rank. Local image ``i`` of rank ``r`` sits at global position ``i * W + r``,
      the interleaving of :class:`~torch.utils.data.DistributedSampler`, so W processes with B
      images each draw exactly the masks that one process with W*B images (same data order) draws.
      Returns (views * batch_size, keep), view-major like the images.

    Indices are sorted (raster order) and live on the CPU.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask_mode={mode!r} is unknown; allowed: {', '.join(MASK_MODES)}")
    if not 1 <= keep <= num_patches:
        raise ValueError(f"keep={keep} must be in [1, {num_patches}]")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size})")
    g = torch.Generator()
    if mode == "shared":
        g.manual_seed(_mask_seed(seed, 0, *key))
        return torch.randperm(num_patches, generator=g)[:keep].sort().values
    g.manual_seed(_mask_seed(seed, 1, *key))
    noise = torch.rand(views, batch_size * world_size, num_patches, generator=g)
    local = noise[:, rank::world_size].reshape(views * batch_size, num_patches)
    return local.argsort(dim=1)[:, :keep].sort(dim=1).values
