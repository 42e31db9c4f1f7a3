"""Masked Siamese Networks loss (Assran et al., 2022), with the PMSN power-law prior option.

Notation (shapes):

- ``B``: images per rank, ``V``: anchor views per image, ``K``: prototypes, ``d``: embedding dim.
- ``anchors`` ``z_a``: ``(B*V, d)`` in **view-major** order, i.e. rows ``v*B .. (v+1)*B - 1`` are
  view ``v`` of images ``0 .. B-1``.
- ``targets`` ``z_t``: ``(B, d)``, one target view per image.
- ``prototypes`` ``Q``: ``(K, d)``.

All three are L2-normalised, then

- ``p_a = softmax(z_a Q^T / tau) @ L`` and ``p_t = softmax(z_t Q^T / tau) @ L`` (targets under
  ``no_grad``), where ``L`` is the ``K x K`` label-smoothing matrix (off-diagonal ``s/K``,
  diagonal ``1 - s + s/K``; the identity for ``s = 0``);
- ``t = sharpen(p_t, T)``, optionally followed by ``sinkhorn(t, n)`` over the global batch;
- ``CE = mean_rows sum_k -t_k log p_a,k`` with ``t`` repeated for every anchor view;
- ``pbar`` = mean of ``p_a`` over the global batch;
  ``R = sum_k pbar_k log pbar_k + log K`` (ME-MAX), or ``KL(pbar || pi)`` with a power-law ``pi``;
- ``H = mean_rows sum_k -p_a,k log p_a,k``;
- ``loss = CE + me_max_weight * R + entropy_weight * H``.
"""

from __future__ import annotations

import inspect
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msn.checks import is_number, own_arguments, raise_problems
from msn.distributed import all_reduce_mean_with_grad, all_reduce_sum_, world_size

__all__ = [
    "MSNLoss",
    "MSNLossOutput",
    "power_law_prior",
    "prototype_logits",
    "prototype_probs",
    "sharpen",
    "sinkhorn",
]

_PRIORS = (None, "power_law")
# Smallest positive normal float32: clamping probabilities at this value only changes
# entries that underflowed to (near) zero, so it guards log(0) without altering the math.
_TINY = torch.finfo(torch.float32).tiny
# Device types on which ``torch.autocast`` can be entered (to switch it *off*).
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu")


@dataclass
class MSNLossOutput:
    """Everything ``MSNLoss.forward`` computes.

    Attributes:
        loss: scalar, ``ce + me_max_weight * me_max + entropy_weight * entropy`` (has grad).
        ce: scalar cross-entropy between repeated targets and anchor probabilities (has grad).
        me_max: scalar, the unweighted regulariser: ME-MAX ``R = sum pbar log pbar + log K`` or,
            with the power-law prior, ``KL(pbar || pi)`` (has grad).
        entropy: scalar, unweighted mean anchor entropy ``H`` (has grad).
        num_prototypes_used: scalar float, number of distinct argmax prototypes over this
            rank's target rows (no grad).
        max_target_prob: scalar, mean over target rows of the row max probability (no grad).
        min_target_prob: scalar, mean over target rows of the row min probability (no grad).
        target_probs: ``(B, K)`` final targets after sharpening/Sinkhorn (detached).
        anchor_probs_mean: ``(K,)`` global mean anchor probability ``pbar`` (detached).
    """

    loss: Tensor
    ce: Tensor
    me_max: Tensor
    entropy: Tensor
    num_prototypes_used: Tensor
    max_target_prob: Tensor
    min_target_prob: Tensor
    target_probs: Tensor
    anchor_probs_mean: Tensor


def prototype_logits(z: Tensor, prototypes: Tensor, temperature: float) -> Tensor:
    """``cos(z, prototypes) / tau``: ``(N, d)`` embeddings and ``(K, d)`` prototypes -> ``(N, K)``."""
    return F.normalize(z, dim=1) @ F.normalize(prototypes, dim=1).t() / temperature


def prototype_probs(z: Tensor, prototypes: Tensor, temperature: float) -> Tensor:
    """Soft assignment ``softmax(cos(z, prototypes) / tau)`` of embeddings to prototypes, ``(N, K)``."""
    return torch.softmax(prototype_logits(z, prototypes, temperature), dim=1)


def _number_problems(name: str, value: Any, minimum: float, strict: bool) -> list[str]:
    if is_number(value) and (value > minimum if strict else value >= minimum):
        return []
    return [f"{name}={value} must be a number {'>' if strict else '>='} {minimum:g}"]


def sharpen(p: Tensor, temperature: float) -> Tensor:
    """Sharpen probabilities: ``p^(1/T) / sum_k p^(1/T)`` row-wise.

    Args:
        p: ``(N, K)`` probabilities (rows sum to 1, entries >= 0).
        temperature: ``T > 0``; ``T < 1`` sharpens, ``T = 1`` is the identity.

    Returns:
        ``(N, K)`` sharpened probabilities, rows sum to 1.
    """
    problems = _number_problems("sharpen temperature", temperature, 0, strict=True)
    if problems:
        raise ValueError(problems[0])
    # Evaluate in log space: p^(1/T) with small T can underflow every entry of a row in
    # float32, whereas softmax(log p / T) subtracts the row max first and stays finite.
    return torch.softmax(p.clamp_min(_TINY).log() / temperature, dim=-1)


@torch.no_grad()
def sinkhorn(t: Tensor, iterations: int) -> Tensor:
    """Sinkhorn-Knopp balancing of target probabilities over the *global* batch.

    Pushes the assignment towards equal prototype usage (each prototype receives
    ``B_global / K`` of the mass) while every sample keeps a distribution summing to 1.
    The sums across the batch dimension (total mass and per-prototype mass) are
    all-reduced so that every rank normalises against the same global marginals; the
    per-sample sums are local. Gives the same result as single-process Sinkhorn on the
    concatenated global batch.

    Args:
        t: ``(B, K)`` probabilities on this rank (e.g. sharpened targets).
        iterations: number of Sinkhorn iterations; ``0`` returns ``t`` unchanged.

    Returns:
        ``(B, K)`` balanced probabilities, rows sum to 1 (no grad).
    """
    if iterations < 0:
        raise ValueError(f"sinkhorn iterations must be >= 0, got {iterations}")
    if iterations == 0:
        return t
    batch, num_protos = t.shape
    global_batch = batch * world_size()

    q = t.t().clone()  # (K, B): clone because the normalisations below are in place
    total = all_reduce_sum_(q.sum().reshape(1))
    q /= total
    for _ in range(iterations):
        # Rows: each prototype gets total mass 1/K, measured over all ranks' samples.
        row_sums = all_reduce_sum_(q.sum(dim=1, keepdim=True))  # (K, 1)
        q /= row_sums.clamp_min(_TINY)
        q /= num_protos
        # Columns: each sample gets mass 1/B_global; samples live on one rank only.
        col_sums = q.sum(dim=0, keepdim=True)  # (1, B)
        q /= col_sums.clamp_min(_TINY)
        q /= global_batch
    q *= global_batch  # columns now sum to 1 -> per-sample distributions
    return q.t()


def power_law_prior(num_prototypes: int, exponent: float, device: torch.device | None = None) -> Tensor:
    """PMSN power-law prior ``pi_k ∝ k^(-exponent)``, ``k = 1..K``.

    Returns:
        ``(K,)`` float32 probabilities summing to 1 (``exponent = 0`` gives uniform).
    """
    k = torch.arange(1, num_prototypes + 1, dtype=torch.float32, device=device)
    return torch.softmax(-exponent * k.log(), dim=0)


class MSNLoss(nn.Module):
    """MSN loss: cross-entropy to sharpened targets + mean-entropy maximisation.

    Args:
        temperature: ``tau`` of the anchor/target softmax over prototype similarities.
        sharpen_temperature: ``T`` used to sharpen target probabilities (can be
            overridden per call, e.g. by a schedule).
        me_max_weight: weight of the regulariser (ME-MAX ``R`` or the PMSN KL).
        entropy_weight: weight of the mean anchor entropy ``H`` (0 disables it).
        sinkhorn_iterations: Sinkhorn iterations on the sharpened targets (0 disables).
        label_smoothing: ``s`` in ``[0, 1)``; prototype labels become
            ``(1 - s) * onehot + s / K``, applied to anchor and target probabilities.
        prior: ``None`` for ME-MAX (uniform target marginal) or ``"power_law"`` for PMSN.
            With ``"power_law"`` the regulariser is ``KL(pbar || pi) = sum_k pbar_k
            log(pbar_k / pi_k)`` -- the *mean prediction* is the first argument. For a
            uniform ``pi`` this is exactly ``R = sum_k pbar_k log pbar_k + log K``.
        power_law_exponent: exponent ``a`` of ``pi_k ∝ k^(-a)``.

    Forward returns an ``MSNLossOutput``; all loss math runs in float32 (float64 for float64
    inputs) regardless of the input dtype or an enclosing autocast region.

    In a distributed run ``pbar`` is the mean over all ranks (each rank must pass the same
    number of images) and Sinkhorn normalises over the global batch; the per-rank loss is
    ``CE_r + R(pbar_global) + H_r``, whose DDP-averaged gradient equals the single-process
    gradient on the concatenated batch.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sharpen_temperature: float = 0.25,
        me_max_weight: float = 1.0,
        entropy_weight: float = 0.0,
        sinkhorn_iterations: int = 3,
        label_smoothing: float = 0.0,
        prior: str | None = None,
        power_law_exponent: float = 0.25,
    ) -> None:
        super().__init__()
        raise_problems(MSNLoss.problems(**own_arguments(locals())))
        self.temperature = float(temperature)
        self.sharpen_temperature = float(sharpen_temperature)
        self.me_max_weight = float(me_max_weight)
        self.entropy_weight = float(entropy_weight)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.label_smoothing = float(label_smoothing)
        self.prior = prior
        self.power_law_exponent = float(power_law_exponent)

    @staticmethod
    def problems(**kwargs: Any) -> list[str]:
        """Every problem of these constructor arguments (the missing ones take their defaults), named
        as the ``model.loss`` config keys; TypeError for an argument it does not take."""
        given = inspect.signature(MSNLoss).bind_partial(**kwargs)
        given.apply_defaults()
        a = given.arguments
        problems = []
        for name in ("temperature", "sharpen_temperature"):
            problems += _number_problems(name, a[name], 0, strict=True)
        for name in ("me_max_weight", "entropy_weight"):
            problems += _number_problems(name, a[name], 0, strict=False)
        iterations = a["sinkhorn_iterations"]
        if not (is_number(iterations) and float(iterations).is_integer() and iterations >= 0):
            problems.append(f"sinkhorn_iterations={iterations} must be an integer >= 0")
        smoothing = a["label_smoothing"]
        if not (is_number(smoothing) and 0 <= smoothing < 1):
            problems.append(f"label_smoothing={smoothing} must be a number in [0, 1)")
        if a["prior"] not in _PRIORS:
            problems.append(f"prior={a['prior']!r} is unknown; allowed: null, power_law")
        elif a["prior"] == "power_law":
            problems += _number_problems("power_law_exponent", a["power_law_exponent"], 0, strict=False)
        return problems

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, sharpen_temperature={self.sharpen_temperature}, "
            f"me_max_weight={self.me_max_weight}, entropy_weight={self.entropy_weight}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}, label_smoothing={self.label_smoothing}, "
            f"prior={self.prior!r}, power_law_exponent={self.power_law_exponent}"
        )

    def _smooth(self, p: Tensor) -> Tensor:
        """``p @ L`` for the label-smoothing matrix ``L``; ``p``: ``(N, K)`` -> ``(N, K)``.

        Because rows of ``p`` sum to 1, ``p @ L = (1 - s) * p + s / K``; using the closed form
        avoids materialising a ``K x K`` matrix (K is up to 65536 in the paper).
        """
        s = self.label_smoothing
        if s == 0:
            return p
        return p * (1.0 - s) + s / p.shape[-1]

    def forward(
        self,
        anchors: Tensor,
        targets: Tensor,
        prototypes: Tensor,
        sharpen_temperature: float | None = None,
    ) -> MSNLossOutput:
        """Compute the MSN loss.

        Args:
            anchors: ``(B*V, d)`` anchor projections, view-major.
            targets: ``(B, d)`` target projections (never receive gradient).
            prototypes: ``(K, d)`` prototypes (gradient only through the anchor branch).
            sharpen_temperature: overrides the constructor's ``T`` for this call.

        Returns:
            ``MSNLossOutput`` (see its docstring for shapes).
        """
        if anchors.ndim != 2 or targets.ndim != 2 or prototypes.ndim != 2:
            raise ValueError(
                "anchors, targets and prototypes must be 2-D, got shapes "
                f"{tuple(anchors.shape)}, {tuple(targets.shape)}, {tuple(prototypes.shape)}"
            )
        if not anchors.shape[1] == targets.shape[1] == prototypes.shape[1]:
            raise ValueError(
                "anchors, targets and prototypes must share the embedding dim, got "
                f"{anchors.shape[1]}, {targets.shape[1]}, {prototypes.shape[1]}"
            )
        num_targets = targets.shape[0]
        if num_targets == 0 or anchors.shape[0] % num_targets != 0:
            raise ValueError(
                f"anchors rows ({anchors.shape[0]}) must be a positive multiple of targets rows "
                f"({num_targets}): anchors are expected as V views of each of the B target images"
            )
        sharpen_t = self.sharpen_temperature if sharpen_temperature is None else float(sharpen_temperature)
        problems = _number_problems("sharpen_temperature", sharpen_t, 0, strict=True)
        if problems:
            raise ValueError(problems[0])

        # Disable autocast: under bf16/fp16 autocast the matmuls below would silently run in
        # half precision again despite the .float() casts, changing softmax/log accuracy.
        device_type = anchors.device.type
        ctx: AbstractContextManager[object] = (
            torch.autocast(device_type=device_type, enabled=False)
            if device_type in _AUTOCAST_DEVICES
            else nullcontext()
        )
        with ctx:
            # At least float32: half precision is promoted, float64 (exactness tests) is kept.
            dtype = torch.promote_types(anchors.dtype, torch.float32)
            return self._compute(anchors.to(dtype), targets.to(dtype), prototypes.to(dtype), sharpen_t)

    def _compute(
        self, anchors: Tensor, targets: Tensor, prototypes: Tensor, sharpen_t: float
    ) -> MSNLossOutput:
        num_views = anchors.shape[0] // targets.shape[0]
        num_protos = prototypes.shape[0]

        # ---- targets: no gradient to the target encoder *nor* to the prototypes ----------
        with torch.no_grad():
            p_t = self._smooth(prototype_probs(targets.detach(), prototypes.detach(), self.temperature))
            t = sharpen(p_t, sharpen_t)
            t = sinkhorn(t, self.sinkhorn_iterations)  # (B, K)

        # ---- anchors ---------------------------------------------------------------------
        anchor_logits = prototype_logits(anchors, prototypes, self.temperature)  # (B*V, K)
        if self.label_smoothing == 0:
            log_p_a = torch.log_softmax(anchor_logits, dim=1)
            p_a = log_p_a.exp()
        else:
            p_a = self._smooth(torch.softmax(anchor_logits, dim=1))
            # Smoothed probabilities are >= s/K > 0; the clamp is only a safety net.
            log_p_a = p_a.clamp_min(_TINY).log()

        # View-major anchors: row v*B + i is view v of image i, so tiling the B target rows
        # V times lines every anchor up with the target of its own image.
        t_rep = t.repeat(num_views, 1)  # (B*V, K)
        ce = -(t_rep * log_p_a).sum(dim=1).mean()

        # ---- ME-MAX / PMSN regulariser on the global mean prediction ---------------------
        pbar = all_reduce_mean_with_grad(p_a.mean(dim=0))  # (K,)
        # The clamp keeps d/dpbar (log pbar + 1) finite if an entry underflows to 0.
        log_pbar = pbar.clamp_min(_TINY).log()
        if self.prior == "power_law":
            log_prior = power_law_prior(num_protos, self.power_law_exponent, device=pbar.device).log()
            me_max = (pbar * (log_pbar - log_prior)).sum()
        else:
            me_max = (pbar * log_pbar).sum() + math.log(num_protos)

        entropy = -(p_a * log_p_a).sum(dim=1).mean()
        loss = ce + self.me_max_weight * me_max + self.entropy_weight * entropy

        with torch.no_grad():
            num_used = torch.unique(t.argmax(dim=1)).numel()
            stats_device = t.device
            return MSNLossOutput(
                loss=loss,
                ce=ce,
                me_max=me_max,
                entropy=entropy,
                num_prototypes_used=torch.tensor(float(num_used), device=stats_device),
                max_target_prob=t.max(dim=1).values.mean(),
                min_target_prob=t.min(dim=1).values.mean(),
                target_probs=t.detach(),
                anchor_probs_mean=pbar.detach(),
            )
