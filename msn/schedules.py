"""MSN's per-iteration schedules as pure functions of the step (no optimizer, no state).

The official recipe stretches every schedule over ``1.25 x`` the real number of iterations
(``ipe_scale``), so training stops before the cosine reaches its end and the EMA momentum ends
near 0.9992 rather than at 1.0.
"""

from __future__ import annotations

import math


def _check(step: int, total: int) -> None:
    if total < 1:
        raise ValueError(f"total steps must be >= 1, got {total}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def lr_at(
    step: int,
    total_steps: int,
    warmup_steps: int,
    start_lr: float = 2e-4,
    ref_lr: float = 1e-3,
    final_lr: float = 1e-6,
    scale: float = 1.25,
) -> float:
    """Linear warmup from ``start_lr`` to ``ref_lr``, then cosine towards ``final_lr``.

    The cosine spans ``scale * total_steps - warmup_steps`` iterations; the official scheduler is
    stepped before each optimizer step, so iteration ``i`` (0-based) uses ``lr_at(i + 1, ...)``.
    """
    _check(step, total_steps)
    if step < warmup_steps:
        return start_lr + (step / max(1, warmup_steps)) * (ref_lr - start_lr)
    t_max = max(1, int(scale * total_steps) - warmup_steps)
    # Clamped so steps past the horizon (a run extended on resume) stay at final_lr instead of
    # climbing back up the cosine; the official run never gets there.
    progress = min(1.0, (step - warmup_steps) / t_max)
    return max(final_lr, final_lr + (ref_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def wd_at(
    step: int, total_steps: int, ref_wd: float = 0.04, final_wd: float = 0.4, scale: float = 1.25
) -> float:
    """Cosine from ``ref_wd`` to ``final_wd`` over ``scale * total_steps`` iterations (stepped like lr)."""
    _check(step, total_steps)
    t_max = max(1, int(scale * total_steps))
    progress = min(1.0, step / t_max)
    wd = final_wd + (ref_wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # Clamp at the end value whichever direction the schedule runs.
    return max(final_wd, wd) if final_wd <= ref_wd else min(final_wd, wd)


def linear_at(step: int, total_steps: int, start: float, end: float, scale: float = 1.25) -> float:
    """Linear ramp from ``start`` to ``end`` over ``scale * total_steps`` iterations.

    Used for the EMA momentum (0.996 -> 1.0) and the sharpening temperature. Iteration ``i``
    (0-based) uses ``linear_at(i, ...)``: the official generator yields its first value first.
    """
    _check(step, total_steps)
    span = scale * total_steps
    return start + min(step, span) * (end - start) / span
