"""Small, stateless helpers for the cross-rank reductions the MSN loss needs.

Everything here degrades to the identity / a no-op when ``torch.distributed`` is not
initialised (or runs with a single process), so the loss code can call these helpers
unconditionally and single-device runs pay no communication cost.

There is no hidden global state: every helper asks ``torch.distributed`` directly, so the
answers follow whatever process group Lightning (or a test) has set up.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "world_size", "all_reduce_mean_with_grad", "all_reduce_sum_"]


def is_distributed() -> bool:
    """True when a default process group is initialised and it has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks in the default process group; ``1`` when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


class _AllReduceMeanWithGrad(torch.autograd.Function):
    """Mean over ranks whose backward is scaled for DDP's gradient *averaging*.

    Derivation (W ranks, equal local batch sizes). Let ``m_r`` be rank r's local quantity
    (e.g. the mean anchor probability vector) and ``pbar = (1/W) * sum_r m_r`` the global
    mean this op returns. A loss term ``R(pbar)`` is then identical on every rank; call
    ``g_r = dR_r/dpbar`` the upstream gradient seen on rank r (normally all ``g_r`` equal).

    DDP optimises the average of the per-rank losses, ``(1/W) * sum_r loss_r``, and realises
    it by averaging parameter gradients: ``grad = (1/W) * sum_s f_s * dm_s/dtheta`` where
    ``f_s`` is what this op's backward hands to rank s. The true gradient of the averaged
    objective w.r.t. ``m_s`` is ``(1/W) * sum_r g_r * (1/W)`` (outer 1/W: DDP average over
    losses, inner 1/W: weight of ``m_s`` inside ``pbar``), and it must reach the parameters
    through the same ``(1/W) * sum_s`` DDP average, hence ``f_s = (1/W) * sum_r g_r``:
    the backward is an all-reduce *mean* of the incoming gradient. When all ``g_r`` are
    equal (the usual case) this is the identity, i.e. the gradient passes through unscaled;
    reducing anyway keeps the op correct if ranks ever weight the term differently.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        # Clone: all_reduce works in place and ``x`` may be needed by other autograd nodes.
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / dist.get_world_size()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad / dist.get_world_size()


def all_reduce_mean_with_grad(x: Tensor) -> Tensor:
    """Average ``x`` (any shape) over ranks, differentiably.

    Forward: element-wise mean of ``x`` over all ranks (same shape as ``x``).
    Backward: all-reduce mean of the incoming gradient, which equals passing it through
    unchanged when the upstream gradient is the same on every rank. Combined with DDP's
    averaging of parameter gradients this reproduces the single-process gradient on the
    concatenated global batch (see ``_AllReduceMeanWithGrad`` for the derivation).
    Assumes every rank contributes the same number of samples to its local ``x``.

    Identity (including gradient) when not distributed.
    """
    if not is_distributed():
        return x
    return _AllReduceMeanWithGrad.apply(x)


@torch.no_grad()
def all_reduce_sum_(x: Tensor) -> Tensor:
    """Sum ``x`` over ranks **in place** without autograd tracking; returns ``x``.

    No-op when not distributed. Meant for statistics on detached tensors (e.g. Sinkhorn
    marginals), never for values that need a gradient.
    """
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
