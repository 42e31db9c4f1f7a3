"""Tests for ``msn.loss`` and ``msn.distributed``.

The reference implementation below is deliberately written from the paper's formulas with
explicit loops and an explicit ``K x K`` label matrix, in float64, without touching any
``msn.loss`` internals, so that it is an independent check of the vectorised float32 code.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msn.distributed import all_reduce_mean_with_grad, all_reduce_sum_, is_distributed, world_size
from msn.loss import MSNLoss, MSNLossOutput, prototype_logits, prototype_probs, sharpen, sinkhorn

# --------------------------------------------------------------------------------------
# Independent float64 reference
# --------------------------------------------------------------------------------------


def _ref_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


def _ref_softmax(x: torch.Tensor) -> torch.Tensor:
    e = (x - x.max(dim=1, keepdim=True).values).exp()
    return e / e.sum(dim=1, keepdim=True)


def _ref_label_matrix(k: int, s: float) -> torch.Tensor:
    lab = torch.full((k, k), s / k, dtype=torch.float64)
    for i in range(k):
        lab[i, i] = 1.0 - s + s / k
    return lab


def _ref_sinkhorn(t: np.ndarray, iterations: int) -> np.ndarray:
    """Single-process Sinkhorn in numpy float64 with explicit row/column loops; t: (B, K)."""
    b, k = t.shape
    q = t.T.copy()  # (K, B)
    q /= q.sum()
    for _ in range(iterations):
        for i in range(k):
            q[i, :] /= q[i, :].sum()
        q /= k
        for j in range(b):
            q[:, j] /= q[:, j].sum()
        q /= b
    q *= b
    return q.T


def _ref_msn(
    anchors: torch.Tensor,
    targets: torch.Tensor,
    protos: torch.Tensor,
    *,
    tau: float = 0.1,
    sharpen_t: float = 0.25,
    me_max_weight: float = 1.0,
    entropy_weight: float = 0.0,
    sinkhorn_iterations: int = 0,
    label_smoothing: float = 0.0,
    prior_exponent: float | None = None,
    target_protos: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """float64 MSN loss; differentiable w.r.t. ``anchors`` and ``protos`` (float64 leaves).

    ``target_protos`` (default: ``protos``) are the prototypes used for the target branch; a
    fixed copy lets finite differences see the same stop-gradient the loss implements.
    """
    n, b, k = anchors.shape[0], targets.shape[0], protos.shape[0]
    v = n // b
    za, zt, q = _ref_normalize(anchors), _ref_normalize(targets.detach()), _ref_normalize(protos)
    q_t = q if target_protos is None else _ref_normalize(target_protos)
    lab = _ref_label_matrix(k, label_smoothing)
    with torch.no_grad():
        p_t = _ref_softmax(zt @ q_t.T / tau) @ lab
        t = p_t ** (1.0 / sharpen_t)
        t = t / t.sum(dim=1, keepdim=True)
        if sinkhorn_iterations > 0:
            t = torch.from_numpy(_ref_sinkhorn(t.numpy(), sinkhorn_iterations))
    p_a = _ref_softmax(za @ q.T / tau) @ lab  # (B*V, K)

    ce = torch.zeros((), dtype=torch.float64)
    for view in range(v):
        for i in range(b):
            ce = ce - (t[i] * p_a[view * b + i].log()).sum()
    ce = ce / n

    pbar = p_a.mean(dim=0)
    if prior_exponent is None:
        reg = (pbar * pbar.log()).sum() + math.log(k)
    else:
        pi = torch.tensor([(i + 1.0) ** (-prior_exponent) for i in range(k)], dtype=torch.float64)
        pi = pi / pi.sum()
        reg = (pbar * (pbar / pi).log()).sum()
    ent = -(p_a * p_a.log()).sum(dim=1).mean()
    total = ce + me_max_weight * reg + entropy_weight * ent
    return {"loss": total, "ce": ce, "me_max": reg, "entropy": ent, "targets": t, "pbar": pbar}


def _inputs(b: int, v: int, k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b * v, d, generator=g),
        torch.randn(b, d, generator=g),
        torch.randn(k, d, generator=g),
    )


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------
# Loss values vs reference
# --------------------------------------------------------------------------------------

CASES = [
    # (B, V, K, kwargs)
    pytest.param(8, 1, 10, {}, id="V1-plain"),
    pytest.param(6, 3, 12, {}, id="V3-plain"),
    pytest.param(8, 2, 10, {"sinkhorn_iterations": 3}, id="sinkhorn3"),
    pytest.param(5, 4, 7, {"label_smoothing": 0.1}, id="label-smoothing"),
    pytest.param(8, 2, 9, {"entropy_weight": 0.3, "me_max_weight": 0.7}, id="entropy"),
    pytest.param(6, 2, 16, {"prior_exponent": 0.25}, id="pmsn"),
    pytest.param(
        6,
        3,
        11,
        {
            "sinkhorn_iterations": 5,
            "label_smoothing": 0.2,
            "entropy_weight": 0.5,
            "prior_exponent": 0.5,
            "sharpen_t": 0.5,
            "tau": 0.2,
        },
        id="everything",
    ),
]


def _module_from_ref_kwargs(kw: dict) -> MSNLoss:
    return MSNLoss(
        temperature=kw.get("tau", 0.1),
        sharpen_temperature=kw.get("sharpen_t", 0.25),
        me_max_weight=kw.get("me_max_weight", 1.0),
        entropy_weight=kw.get("entropy_weight", 0.0),
        sinkhorn_iterations=kw.get("sinkhorn_iterations", 0),
        label_smoothing=kw.get("label_smoothing", 0.0),
        prior=None if kw.get("prior_exponent") is None else "power_law",
        power_law_exponent=kw.get("prior_exponent") or 0.25,
    )


@pytest.mark.parametrize("b, v, k, kw", CASES)
def test_matches_reference_values_and_gradients(b: int, v: int, k: int, kw: dict) -> None:
    anchors, targets, protos = _inputs(b, v, k, d=16, seed=b * 100 + v * 10 + k)
    a32 = anchors.clone().requires_grad_()
    q32 = protos.clone().requires_grad_()
    out = _module_from_ref_kwargs(kw)(a32, targets, q32)
    assert isinstance(out, MSNLossOutput)
    out.loss.backward()

    a64 = anchors.double().requires_grad_()
    q64 = protos.double().requires_grad_()
    ref = _ref_msn(a64, targets.double(), q64, **kw)
    ref["loss"].backward()

    for name in ("loss", "ce", "me_max", "entropy"):
        assert getattr(out, name).dtype == torch.float32
        _close(getattr(out, name), ref[name])
    _close(out.target_probs, ref["targets"])
    _close(out.anchor_probs_mean, ref["pbar"])
    # float32 forward + backward vs float64 autograd of the reference
    _close(a32.grad, a64.grad, tol=1e-4)
    _close(q32.grad, q64.grad, tol=1e-4)


def test_total_is_weighted_sum_of_terms() -> None:
    anchors, targets, protos = _inputs(4, 2, 8, 8, seed=1)
    out = MSNLoss(me_max_weight=0.3, entropy_weight=0.2)(anchors, targets, protos)
    _close(out.loss, out.ce + 0.3 * out.me_max + 0.2 * out.entropy, tol=1e-6)


def test_reference_gradcheck_tiny() -> None:
    """Sanity-check the reference's own autograd against finite differences (float64).

    Targets are a stop-gradient branch, so finite differences must not perturb the prototypes
    the targets are computed from: those are held fixed via ``target_protos``.
    """
    anchors, targets, protos = _inputs(2, 2, 3, 4, seed=3)
    fixed = protos.double()

    def f(a: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return _ref_msn(
            a,
            targets.double(),
            q,
            entropy_weight=0.5,
            label_smoothing=0.1,
            sinkhorn_iterations=2,
            target_protos=fixed,
        )["loss"]

    assert torch.autograd.gradcheck(
        f, (anchors.double().requires_grad_(), protos.double().requires_grad_()), eps=1e-6, atol=1e-5
    )


def test_power_law_prior_with_zero_exponent_equals_me_max() -> None:
    """KL(pbar || uniform) = sum pbar log pbar + log K, i.e. exactly the ME-MAX term."""
    anchors, targets, protos = _inputs(6, 2, 10, 8, seed=4)
    me = MSNLoss(sinkhorn_iterations=0)(anchors, targets, protos)
    kl = MSNLoss(sinkhorn_iterations=0, prior="power_law", power_law_exponent=0.0)(anchors, targets, protos)
    _close(kl.me_max, me.me_max, tol=1e-6)
    _close(kl.loss, me.loss, tol=1e-6)


def test_power_law_prior_direction_is_kl_pbar_to_prior() -> None:
    anchors, targets, protos = _inputs(6, 2, 10, 8, seed=5)
    out = MSNLoss(prior="power_law", power_law_exponent=0.5)(anchors, targets, protos)
    pbar = out.anchor_probs_mean.double()
    pi = torch.arange(1, 11, dtype=torch.float64) ** -0.5
    pi = pi / pi.sum()
    _close(out.me_max, (pbar * (pbar / pi).log()).sum())
    reverse = (pi * (pi / pbar).log()).sum()
    assert not torch.isclose(out.me_max.double(), reverse, rtol=1e-3)


# --------------------------------------------------------------------------------------
# Gradient flow, dtypes, overrides
# --------------------------------------------------------------------------------------


def test_targets_receive_no_gradient_and_prototypes_only_through_anchors() -> None:
    anchors, targets, protos = _inputs(4, 2, 6, 8, seed=6)
    anchors.requires_grad_()
    targets.requires_grad_()
    protos.requires_grad_()
    loss_fn = MSNLoss(sinkhorn_iterations=3)
    loss_fn(anchors, targets, protos).loss.backward()
    assert targets.grad is None or torch.count_nonzero(targets.grad) == 0
    # Same prototype gradient when the target branch sees a detached copy of the prototypes.
    protos2 = protos.detach().clone().requires_grad_()
    out2 = loss_fn(anchors.detach(), targets.detach(), protos2)
    out2.loss.backward()
    _close(protos.grad, protos2.grad, tol=1e-6)


def test_mixed_precision_inputs_and_autocast_use_float32_math() -> None:
    anchors, targets, protos = _inputs(4, 2, 8, 16, seed=7)
    a16, t16, q16 = anchors.bfloat16(), targets.bfloat16(), protos.bfloat16()
    loss_fn = MSNLoss(entropy_weight=0.1)
    ref = loss_fn(a16.float(), t16.float(), q16.float())
    out = loss_fn(a16, t16, q16)
    assert out.loss.dtype == torch.float32
    _close(out.loss, ref.loss, tol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = loss_fn(a16, t16, q16)
    assert out_ac.loss.dtype == torch.float32
    _close(out_ac.loss, ref.loss, tol=1e-6)


def test_sharpen_temperature_override() -> None:
    anchors, targets, protos = _inputs(4, 2, 8, 8, seed=8)
    overridden = MSNLoss(sharpen_temperature=0.25)(anchors, targets, protos, sharpen_temperature=0.6)
    direct = MSNLoss(sharpen_temperature=0.6)(anchors, targets, protos)
    _close(overridden.loss, direct.loss, tol=1e-7)
    with pytest.raises(ValueError, match="sharpen_temperature"):
        MSNLoss()(anchors, targets, protos, sharpen_temperature=0.0)


def test_prototype_probs_is_the_softmax_of_cosine_similarity_over_temperature() -> None:
    g = torch.Generator().manual_seed(21)
    z = torch.randn(5, 8, generator=g, dtype=torch.float64)
    protos = torch.randn(7, 8, generator=g, dtype=torch.float64)
    expected = _ref_softmax(_ref_normalize(z) @ _ref_normalize(protos).T / 0.1)
    _close(prototype_probs(z, protos, 0.1), expected, tol=1e-12)
    _close(torch.softmax(prototype_logits(z, protos, 0.1), dim=1), expected, tol=1e-12)
    # Scale-free in both arguments: only directions count.
    _close(prototype_probs(3.0 * z, 0.5 * protos, 0.1), expected, tol=1e-12)


# --------------------------------------------------------------------------------------
# sharpen / sinkhorn
# --------------------------------------------------------------------------------------


def test_sharpen_properties() -> None:
    p = torch.softmax(torch.randn(5, 7, generator=torch.Generator().manual_seed(9)), dim=1)
    s = sharpen(p, 0.25)
    _close(s.sum(dim=1), torch.ones(5), tol=1e-6)
    _close(sharpen(p, 1.0), p, tol=1e-6)
    assert torch.all(s.max(dim=1).values > p.max(dim=1).values)
    assert torch.all(sharpen(p, 0.1).max(dim=1).values > s.max(dim=1).values)
    expected = p.double() ** 4
    _close(s, expected / expected.sum(dim=1, keepdim=True))


def test_sinkhorn_balances_and_matches_reference() -> None:
    b, k = 12, 4
    t = torch.softmax(torch.randn(b, k, generator=torch.Generator().manual_seed(10)) * 2, dim=1)
    assert sinkhorn(t, 0) is t
    _close(sinkhorn(t, 3), torch.from_numpy(_ref_sinkhorn(t.double().numpy(), 3)))
    balanced = sinkhorn(t, 200)
    _close(balanced.sum(dim=1), torch.ones(b), tol=1e-5)
    _close(balanced.sum(dim=0), torch.full((k,), b / k), tol=1e-4)
    # Few iterations: rows already sum to 1, columns only approximately balanced.
    _close(sinkhorn(t, 1).sum(dim=1), torch.ones(b), tol=1e-5)


# --------------------------------------------------------------------------------------
# Statistics and ME-MAX properties
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sinkhorn_iterations", [0, 3])
def test_statistics_match_brute_force(sinkhorn_iterations: int) -> None:
    anchors, targets, protos = _inputs(16, 2, 8, 4, seed=11)
    out = MSNLoss(sinkhorn_iterations=sinkhorn_iterations)(anchors, targets, protos)
    rows = out.target_probs.tolist()
    argmaxes = {max(range(len(r)), key=r.__getitem__) for r in rows}
    assert out.num_prototypes_used.dtype == torch.float32
    assert out.num_prototypes_used.item() == float(len(argmaxes))
    assert out.max_target_prob.item() == pytest.approx(sum(max(r) for r in rows) / len(rows), rel=1e-5)
    assert out.min_target_prob.item() == pytest.approx(sum(min(r) for r in rows) / len(rows), rel=1e-5)
    for name in ("num_prototypes_used", "max_target_prob", "min_target_prob", "target_probs"):
        assert not getattr(out, name).requires_grad


def test_num_prototypes_used_counts_collapse() -> None:
    # All targets identical -> a single argmax prototype.
    _, _, protos = _inputs(1, 1, 8, 4, seed=12)
    targets = protos[3:4].repeat(5, 1)
    out = MSNLoss()(targets.repeat(2, 1), targets, protos)
    assert out.num_prototypes_used.item() == 1.0


def test_me_max_nonnegative_and_zero_for_uniform_predictions() -> None:
    loss_fn = MSNLoss(sinkhorn_iterations=0)
    for seed in range(5):
        anchors, targets, protos = _inputs(4, 2, 6, 8, seed=100 + seed)
        assert loss_fn(anchors, targets, protos).me_max.item() >= 0.0
    # Anchors orthogonal to every prototype -> all logits 0 -> uniform p_a -> pbar uniform.
    k, d = 6, 5
    protos = torch.randn(k, d, generator=torch.Generator().manual_seed(13))
    protos[:, 0] = 0.0
    anchors = torch.zeros(8, d)
    anchors[:, 0] = 1.0
    out = loss_fn(anchors, torch.randn(4, d), protos)
    _close(out.anchor_probs_mean, torch.full((k,), 1.0 / k), tol=1e-7)
    assert abs(out.me_max.item()) < 1e-6
    assert out.entropy.item() == pytest.approx(math.log(k), rel=1e-6)


# --------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"sharpen_temperature": 0.0},
        {"me_max_weight": -0.1},
        {"entropy_weight": -1.0},
        {"sinkhorn_iterations": -1},
        {"sinkhorn_iterations": 1.5},
        {"label_smoothing": -0.1},
        {"label_smoothing": 1.0},
        {"prior": "uniform"},
        {"prior": "power_law", "power_law_exponent": -1.0},
    ],
)
def test_bad_constructor_args_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        MSNLoss(**kwargs)


def test_problems_name_every_bad_argument_at_once() -> None:
    # Keys as in the model.loss config node; validate_config reports them before anything is built.
    assert MSNLoss.problems(temperature=0, sinkhorn_iterations=1.5, prior="uniform") == [
        "temperature=0 must be a number > 0",
        "sinkhorn_iterations=1.5 must be an integer >= 0",
        "prior='uniform' is unknown; allowed: null, power_law",
    ]
    assert MSNLoss.problems(prior="power_law", power_law_exponent=-1) == [
        "power_law_exponent=-1 must be a number >= 0"
    ]
    assert MSNLoss.problems() == [] and MSNLoss.problems(sinkhorn_iterations=3.0) == []
    assert MSNLoss.problems(temperature="abc") == ["temperature=abc must be a number > 0"]
    with pytest.raises(ValueError, match=r"^temperature=0 must be a number > 0; me_max_weight=-1 must be"):
        MSNLoss(temperature=0, me_max_weight=-1)
    with pytest.raises(TypeError):
        MSNLoss.problems(temprature=0.1)


def test_bad_shapes_raise() -> None:
    loss_fn = MSNLoss()
    with pytest.raises(ValueError, match="multiple of targets rows"):
        loss_fn(torch.randn(7, 4), torch.randn(3, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="embedding dim"):
        loss_fn(torch.randn(6, 4), torch.randn(3, 5), torch.randn(5, 4))
    with pytest.raises(ValueError, match="2-D"):
        loss_fn(torch.randn(6, 4, 1), torch.randn(3, 4), torch.randn(5, 4))
    with pytest.raises(ValueError):
        sharpen(torch.ones(2, 2) / 2, 0.0)
    with pytest.raises(ValueError):
        sinkhorn(torch.ones(2, 2) / 2, -1)


# --------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------


def test_distributed_helpers_without_process_group() -> None:
    assert not is_distributed()
    assert world_size() == 1
    x = torch.randn(5, requires_grad=True)
    y = all_reduce_mean_with_grad(x)
    _close(y, x, tol=0.0)
    w = torch.randn(5)
    (y * w).sum().backward()
    _close(x.grad, w, tol=0.0)
    z = torch.randn(3)
    before = z.clone()
    assert all_reduce_sum_(z) is z
    _close(z, before, tol=0.0)


_WORLD = 2
_DDP_B, _DDP_V, _DDP_K, _DDP_D = 8, 3, 10, 12
_DDP_CONFIGS: dict[str, dict] = {
    "me_max": {"sinkhorn_iterations": 3, "label_smoothing": 0.1, "entropy_weight": 0.5},
    "pmsn": {"sinkhorn_iterations": 0, "prior": "power_law", "power_law_exponent": 0.5},
}


def _rank_rows(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the full (view-major) anchors / targets that rank ``rank`` owns.

    Rank r holds images r*B/W .. (r+1)*B/W - 1; its local anchors must again be view-major,
    so it takes that image slice out of every view block.
    """
    per = _DDP_B // _WORLD
    images = torch.arange(rank * per, (rank + 1) * per)
    anchor_rows = torch.cat([v * _DDP_B + images for v in range(_DDP_V)])
    return anchor_rows, images


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    # Loopback only: keeps gloo off whatever interface the hostname happens to resolve to.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=_WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        assert is_distributed() and world_size() == _WORLD
        anchors, targets, protos = _inputs(_DDP_B, _DDP_V, _DDP_K, _DDP_D, seed=2024)
        anchor_rows, images = _rank_rows(rank)
        result: dict[str, object] = {}
        for name, cfg in _DDP_CONFIGS.items():
            a = anchors[anchor_rows].clone().requires_grad_()
            q = protos.clone().requires_grad_()
            out = MSNLoss(**cfg)(a, targets[images], q)
            out.loss.backward()
            result[name] = {
                "loss": out.loss.detach(),
                "me_max": out.me_max.detach(),
                "pbar": out.anchor_probs_mean,
                "targets": out.target_probs,
                "anchor_grad": a.grad,
                "proto_grad": q.grad,
            }
        # Standalone Sinkhorn on this rank's slice of a fixed global batch.
        t = torch.softmax(torch.randn(_DDP_B, _DDP_K, generator=torch.Generator().manual_seed(7)), dim=1)
        result["sinkhorn"] = sinkhorn(t[images], 4)
        # all_reduce_mean_with_grad: forward mean, backward all-reduce mean of upstream grads.
        x = torch.full((3,), float(rank + 1), requires_grad=True)
        y = all_reduce_mean_with_grad(x)
        (y * (rank + 1.0)).sum().backward()
        result["arm_forward"] = y.detach()
        result["arm_grad"] = x.grad
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=_WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(_WORLD)]

    anchors, targets, protos = _inputs(_DDP_B, _DDP_V, _DDP_K, _DDP_D, seed=2024)
    for name, cfg in _DDP_CONFIGS.items():
        a = anchors.clone().requires_grad_()
        q = protos.clone().requires_grad_()
        full = MSNLoss(**cfg)(a, targets, q)
        full.loss.backward()
        local = [r[name] for r in ranks]

        # (1) the regulariser sees the global pbar on every rank; CE/H are per-rank means of
        # equal-sized shards, so the DDP objective (mean of rank losses) is the full loss.
        for r in range(_WORLD):
            _close(local[r]["me_max"], full.me_max, tol=1e-6)
            _close(local[r]["pbar"], full.anchor_probs_mean, tol=1e-6)
        _close(sum(lr["loss"] for lr in local) / _WORLD, full.loss, tol=1e-6)

        # (2) Sinkhorn over ranks == Sinkhorn on the concatenated batch.
        _close(torch.cat([lr["targets"] for lr in local]), full.target_probs, tol=1e-6)

        # (3) gradients. Shared parameters (prototypes): DDP averages -> equals full grad.
        _close(sum(lr["proto_grad"] for lr in local) / _WORLD, q.grad, tol=1e-6)
        # Per-sample anchors: every term is a mean over B*V/W local rows on a rank versus
        # B*V rows in the full batch (the ME-MAX term too, because the backward of
        # all_reduce_mean_with_grad is the identity), so the rank-local anchor grad is
        # W x the full-batch grad of the same rows; DDP's later 1/W averaging of the encoder
        # gradients cancels this factor exactly.
        for r in range(_WORLD):
            anchor_rows, _ = _rank_rows(r)
            _close(local[r]["anchor_grad"], _WORLD * a.grad[anchor_rows], tol=1e-6)

    t = torch.softmax(torch.randn(_DDP_B, _DDP_K, generator=torch.Generator().manual_seed(7)), dim=1)
    _close(torch.cat([r["sinkhorn"] for r in ranks]), sinkhorn(t, 4), tol=1e-6)
    _close(torch.cat([r["sinkhorn"] for r in ranks]), torch.from_numpy(_ref_sinkhorn(t.double().numpy(), 4)))

    # Forward: mean of (1, 2) = 1.5. Backward: upstream grads are 1 and 2 -> mean 1.5 each.
    for r in ranks:
        _close(r["arm_forward"], torch.full((3,), 1.5), tol=0.0)
        _close(r["arm_grad"], torch.full((3,), 1.5), tol=0.0)
