"""Random patch masking (MSN's "random masking" of the anchor view), as pure tensor functions.

MSN drops patch tokens after the position embedding was added, so kept tokens still know where
they came from; the class token is always kept. The number of kept patches is static,
``floor(N * (1 - ratio))``, so every batch has the same shape (friendly to torch.compile and to
batching views of one size together).

Every draw goes through :func:`keep_indices` and the one sampler of its mode; whether it uses the
global random state or a generator keyed by a seed (:func:`mask_generator`) is only which
generator is handed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def _shared_order(
    num_patches: int, views: int, batch_size: int, rank: int, world_size: int, device: Any, generator: Any
) -> Tensor:
    """One random order of the patches for every image of every rank: (N,)."""
    return torch.randperm(num_patches, device=device, generator=generator)


def _per_sample_order(
    num_patches: int, views: int, batch_size: int, rank: int, world_size: int, device: Any, generator: Any
) -> Tensor:
    """A random order per image of the global batch, this rank's rows: (views * batch_size, N).

    Local image ``i`` of rank ``r`` sits at global position ``i * W + r``, the interleaving of
    :class:`~torch.utils.data.DistributedSampler`, so W processes with B images each draw exactly
    the orders that one process with W*B images draws (from the same generator state).
    """
    noise = torch.rand(views, batch_size * world_size, num_patches, device=device, generator=generator)
    return noise[:, rank::world_size].reshape(views * batch_size, num_patches).argsort(dim=-1)


# The draw of each mode; the position of a mode also salts its seeded generator.
_PATCH_ORDERS: dict[str, Callable[..., Tensor]] = {"shared": _shared_order, "per_sample": _per_sample_order}
MASK_MODES = tuple(_PATCH_ORDERS)


def mask_problems(mask_ratio: Any = 0.0, mask_mode: Any = "shared") -> list[str]:
    """What is wrong with a mask ratio and mode (named as the ``model`` config keys), one message each."""
    problems = []
    if not (isinstance(mask_ratio, (int, float)) and 0.0 <= mask_ratio < 1.0):
        problems.append(f"mask_ratio={mask_ratio} must be a number in [0, 1)")
    if not (isinstance(mask_mode, str) and mask_mode in MASK_MODES):
        problems.append(f"mask_mode={mask_mode!r} is unknown; allowed: {', '.join(MASK_MODES)}")
    return problems


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches kept of ``num_patches`` at ``mask_ratio`` in [0, 1): ``floor(N * (1 - r))``, at least 1."""
    problems = mask_problems(mask_ratio=mask_ratio)
    if problems:
        raise ValueError(problems[0])
    # Same float expression as the official code so keep counts agree exactly; at least one patch
    # survives so a tiny focal grid with a high ratio still has content.
    return max(1, math.floor(num_patches * (1.0 - mask_ratio)))


def keep_indices(
    mode: str,
    num_patches: int,
    keep: int,
    views: int = 1,
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices (into the patch tokens, 0-based, sorted: raster order) of the patches to keep.

    Returns:
        (keep,) for ``mode="shared"``: one subset for every image of every rank (the official
        behaviour: its processes seed their random state alike and so draw the same permutation);
        (views * batch_size, keep) for ``mode="per_sample"``: one subset per image of this rank,
        view-major like the images, drawn for the global batch of ``world_size`` ranks.
    """
    problems = mask_problems(mask_mode=mode)
    if not 1 <= keep <= num_patches:
        problems.append(f"keep={keep} must be in [1, {num_patches}]")
    if not 0 <= rank < world_size:
        problems.append(f"rank={rank} must be in [0, {world_size})")
    if problems:
        raise ValueError("; ".join(problems))
    order = _PATCH_ORDERS[mode](num_patches, views, batch_size, rank, world_size, device, generator)
    return order[..., :keep].sort(dim=-1).values


def sample_keep_indices(
    batch_size: int,
    num_patches: int,
    keep: int,
    mode: str = "shared",
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`keep_indices` of one view of ``batch_size`` images in one process: (keep,) shared,
    (B, keep) per sample; from ``generator``, else the global random state."""
    return keep_indices(mode, num_patches, keep, batch_size=batch_size, device=device, generator=generator)


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


def mask_generator(seed: int, mode: str, key: Sequence[int]) -> torch.Generator:
    """A CPU generator that is a pure function of ``(seed, mode, key)``: no global random state.

    ``key`` names the draw (e.g. ``(step, batch_idx, group)``), so a resumed run draws the very
    same masks, and every rank draws alike without being seeded alike.
    """
    problems = mask_problems(mask_mode=mode)
    if problems:
        raise ValueError(problems[0])
    return torch.Generator().manual_seed(_mask_seed(seed, MASK_MODES.index(mode), *key))


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
    """:func:`keep_indices` of ``views`` views of ``batch_size`` images on ``rank`` of
    ``world_size``, drawn from :func:`mask_generator` of ``(seed, mode, key)``; on the CPU.

    ``shared``: all ranks drop the same patches. ``per_sample``: W processes with B images draw
    exactly the masks of one process with W*B images (same data order).
    """
    generator = mask_generator(seed, mode, key)
    return keep_indices(mode, num_patches, keep, views, batch_size, rank, world_size, generator=generator)
