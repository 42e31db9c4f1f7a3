"""Exponential moving average of parameters (the MSN target network)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * source``, for parameters only.

    Buffers (BatchNorm running statistics) are not averaged: the official target network runs
    in train mode with batch statistics. One fused ``_foreach_lerp_`` over all tensors instead of
    a Python loop of small kernels.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum {momentum} must be in [0, 1]")
    t_params = list(target.parameters())
    s_params = list(source.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("target and source modules have different parameter lists")
    # lerp(t, s, w) = t + w * (s - t) = (1 - w) * t + w * s, with w = 1 - momentum.
    torch._foreach_lerp_(t_params, [p.detach() for p in s_params], 1.0 - momentum)
