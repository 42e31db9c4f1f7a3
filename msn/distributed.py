"""Small, stateless helpers for the cross-rank reductions MSN needs: the loss (global-batch ME-MAX
and Sinkhorn) and the heads' BatchNorm (global-batch statistics, on GPUs and CPUs alike).

Everything here degrades to the identity / a no-op when ``torch.distributed`` is not
initialised (or runs with a single process), so the loss code can call these helpers
unconditionally and single-device runs pay no communication cost.

There is no hidden global state: every helper asks ``torch.distributed`` directly, so the
answers follow whatever process group Lightning (or a test) has set up.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "SyncBatchNorm1d",
    "all_reduce_mean_with_grad",
    "all_reduce_sum_",
    "all_reduce_sum_with_grad",
    "clip_grad_norm_",
    "is_distributed",
    "rank",
    "revert_sync_batchnorm",
    "sync_batchnorm",
    "world_size",
]


def is_distributed() -> bool:
    """True when a default process group is initialised and it has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks in the default process group; ``1`` when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Global rank of this process; ``0`` when not distributed."""
    return dist.get_rank() if is_distributed() else 0


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks whose backward is the sum over ranks of the incoming gradient.

    Used for statistics that every rank's loss depends on (BatchNorm sums): rank r's local
    contribution ``s_r`` enters ``S = sum_r s_r`` on every rank, so the gradient of the DDP
    objective ``(1/W) sum_q loss_q`` w.r.t. ``s_r`` is ``(1/W) sum_q g_q``; DDP supplies the
    ``1/W`` when it averages the parameter gradients, so the backward hands ``sum_q g_q`` on.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(x: Tensor) -> Tensor:
    """Sum ``x`` (any shape) over ranks, differentiably (see ``_AllReduceSumWithGrad``).

    Identity (including gradient) when not distributed.
    """
    if not is_distributed():
        return x
    return _AllReduceSumWithGrad.apply(x)


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


@torch.no_grad()
def clip_grad_norm_(params: Iterable[Tensor], max_norm: float, sharded: bool = False) -> Tensor:
    """Scale the gradients of ``params`` so that their global L2 norm is at most ``max_norm``.

    ``sharded=False`` is ``torch.nn.utils.clip_grad_norm_``. ``sharded=True`` is for gradients
    split over ranks (FSDP: each rank holds a piece of every gradient): the squared norms of the
    local pieces are summed over ranks before the norm is taken, so every rank scales by the same
    factor, the one of the whole gradient. Returns the total norm (scalar tensor).
    """
    params = list(params)
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros(1, dtype=torch.float32, device=device)
    for g in grads:
        squares += g.detach().float().pow(2).sum()
    total = all_reduce_sum_(squares).sqrt()[0]
    # Same rule as torch: scale by max_norm / (norm + 1e-6) when that is below 1.
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if grads:
        torch._foreach_mul_(grads, scale)
    return total


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training-mode statistics are those of the global batch, on any device.

    ``torch.nn.SyncBatchNorm`` only runs on GPUs; this one all-reduces the sums itself, so it
    runs with gloo on CPUs as well (the 2-process equivalence test uses it) and with NCCL on GPUs.
    Mean and variance are computed in two passes (sum, then sum of squared deviations from the
    global mean) in float32 at least, like single-process BatchNorm, so W processes with B rows each give
    what one process with W*B rows gives. Without a process group, or in eval mode, it is a plain
    BatchNorm1d. Input (N, C) only (what the projection head feeds it).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        if x.ndim != 2:
            raise ValueError(f"SyncBatchNorm1d expects (N, C) input, got shape {tuple(x.shape)}")
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in float32 at least
        # Count rides along with the sums (its gradient is ignored): one all-reduce, not two.
        first = all_reduce_sum_with_grad(torch.cat([xf.sum(dim=0), xf.new_tensor([x.shape[0]])]))
        count = first[-1].detach()
        mean = first[:-1] / count
        centred = xf - mean
        var = all_reduce_sum_with_grad(centred.pow(2).sum(dim=0)) / count
        y = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # Running variance is unbiased (N - 1), as in torch's BatchNorm.
        unbiased = var * count / (count - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def sync_batchnorm(module: nn.Module) -> int:
    """Turn every ``nn.BatchNorm1d`` inside ``module`` into :class:`SyncBatchNorm1d`, in place.

    Only the class changes (same parameters, buffers and state-dict keys), so optimizers and
    checkpoints are unaffected. Returns the number of layers converted.
    """
    converted = 0
    for m in module.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = SyncBatchNorm1d
            converted += 1
    return converted


def revert_sync_batchnorm(module: nn.Module) -> int:
    """Undo :func:`sync_batchnorm` in place; returns the number of layers reverted."""
    reverted = 0
    for m in module.modules():
        if type(m) is SyncBatchNorm1d:
            m.__class__ = nn.BatchNorm1d
            reverted += 1
    return reverted
