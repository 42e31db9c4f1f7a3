"""MSN projection head and prototypes."""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from msn.checks import own_arguments, raise_problems


def init_like_official(module: nn.Module) -> None:
    """trunc_normal(0.02) for Linear weights, zero biases, LayerNorm/BatchNorm weight 1 bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ProjectionHead(nn.Sequential):
    """Linear(D, H)-BN-GELU-Linear(H, H)-BN-GELU-Linear(H, out), no BN on the output.

    Layer names (``fc1, bn1, gelu1, fc2, bn2, gelu2, fc3``) are the official ones, so an official
    checkpoint's ``fc.*`` keys map one to one. Input (B, D), output (B, out).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, use_bn: bool = True) -> None:
        raise_problems(ProjectionHead.problems(**own_arguments(locals())))

        def norm() -> nn.Module:
            return nn.BatchNorm1d(hidden_dim) if use_bn else nn.Identity()

        super().__init__(
            OrderedDict(
                fc1=nn.Linear(in_dim, hidden_dim),
                bn1=norm(),
                gelu1=nn.GELU(),
                fc2=nn.Linear(hidden_dim, hidden_dim),
                bn2=norm(),
                gelu2=nn.GELU(),
                fc3=nn.Linear(hidden_dim, out_dim),
            )
        )
        init_like_official(self)

    @staticmethod
    def problems(**kwargs: Any) -> list[str]:
        """Every problem of these constructor arguments (the missing ones take their defaults), named
        as the ``model.head`` config keys; TypeError for an argument it does not take."""
        given = inspect.signature(ProjectionHead).bind_partial(**kwargs)
        given.apply_defaults()
        dims = [(k, v) for k, v in given.arguments.items() if k.endswith("_dim")]
        return [f"{k}={v!r} must be an integer >= 1" for k, v in dims if not (isinstance(v, int) and v >= 1)]


def prototypes_problems(num_prototypes: Any) -> list[str]:
    """What is wrong with a number of prototypes (the ``model.num_prototypes`` config key)."""
    if isinstance(num_prototypes, int) and num_prototypes >= 1:
        return []
    return [f"num_prototypes={num_prototypes} must be an integer >= 1"]


def init_prototypes(num_prototypes: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
    """(K, dim) prototypes drawn from U(-1/sqrt(dim), 1/sqrt(dim)), the official init."""
    raise_problems(prototypes_problems(num_prototypes))
    bound = 1.0 / math.sqrt(dim)
    return torch.empty(num_prototypes, dim).uniform_(-bound, bound, generator=generator)
