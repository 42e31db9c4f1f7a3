"""Speed options of MSNModule: torch.compile, bf16-mixed (loss in float32), fused attention, fused AdamW.

Tests marked ``cuda`` need a GPU (``benchmarks/gpu_check.sh`` runs them); they are skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from msn import backbone
from msn.module import MSNModule
from tests.helpers import fit_steps, tiny_module

B, VIEWS = 4, (16, 16, 8, 8)  # target, one masked anchor, two focal views


class RandomViews(Dataset):
    def __len__(self) -> int:
        return 3 * B

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return [torch.randn(1, s, s, generator=g) for s in VIEWS], 0


class RecordingMSN(MSNModule):
    """Records the loss of every step and the dtypes the loss saw."""

    def on_fit_start(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.dtypes: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []
        criterion = self.criterion

        def recording(anchors, targets, prototypes, **kw):
            out = type(criterion).forward(criterion, anchors, targets, prototypes, **kw)
            self.dtypes.append((anchors.dtype, targets.dtype, out.loss.dtype))
            return out

        criterion.forward = recording

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.detach().float().cpu())
        return loss


def _module(**kw) -> RecordingMSN:
    return tiny_module(RecordingMSN, mask_seed=3, optim={"warmup_epochs": 1}, **kw)


def _fit(model: RecordingMSN, steps: int = 2, accelerator: str = "cpu", **trainer_kw) -> RecordingMSN:
    loader = DataLoader(RandomViews(), batch_size=B, drop_last=True)
    return fit_steps(model, loader, steps, accelerator, devices=1, **trainer_kw)


# Runs compared parameter by parameter are float64: Adam divides every gradient by its own RMS,
# so rounding noise in gradients that are exactly zero in exact arithmetic (biases before
# BatchNorm, the key bias of attention) would become visible float32 parameter differences.
EXACT = "64-true"


def _assert_same_run(a: MSNModule, b: MSNModule, tol: float) -> None:
    torch.testing.assert_close(torch.stack(a.losses), torch.stack(b.losses), rtol=tol, atol=tol)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p.float().cpu(), q.float().cpu(), rtol=tol, atol=tol, msg=name)


def test_encoders_use_fused_scaled_dot_product_attention():
    model = _module()
    assert all(block.attn.fused_attn for block in model.encoder.blocks)
    assert all(block.attn.fused_attn for block in model.target_encoder.blocks)


@pytest.mark.parametrize("value", [1, "", None])
def test_bad_compile_option(value):
    with pytest.raises(ValueError, match="model.compile"):
        _module(compile=value)


def test_bf16_mixed_runs_the_encoders_in_bf16_and_the_loss_in_float32():
    model = _fit(_module(), precision="bf16-mixed")
    assert len(model.dtypes) == 2
    for anchors, targets, loss in model.dtypes:
        assert (anchors, targets, loss) == (torch.bfloat16, torch.bfloat16, torch.float32)
    assert all(torch.isfinite(loss) for loss in model.losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    # Close to the fp32 run: bf16 changes rounding, not the computation.
    reference = _fit(_module())
    torch.testing.assert_close(torch.stack(model.losses), torch.stack(reference.losses), rtol=0.05, atol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True])
def test_compiled_encoders_train_like_eager(packed):
    """Through Lightning (setup compiles): 2 steps with torch.compile equal 2 eager steps.

    ``aot_eager`` traces forward and backward exactly as inductor does, without generating C++,
    so it checks the compile wiring in seconds; the inductor run is the next test.
    """
    eager = _fit(_module(packed_views=packed), precision=EXACT)
    compiled = _fit(_module(packed_views=packed, compile="aot_eager"), precision=EXACT)
    assert compiled._encode is not eager._encode
    _assert_same_run(compiled, eager, tol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler"
)
@pytest.mark.skipif(
    os.environ.get("MSN_TEST_INDUCTOR") != "1",
    reason="a fresh inductor compile takes minutes on a small CPU; set MSN_TEST_INDUCTOR=1",
)
def test_inductor_compiled_packed_step_matches_eager():
    """One real inductor compile (C++ kernels on CPU): packed views, 1 step.

    Opt-in: 1-4 minutes of C++ compilation on a 2-core machine (the compile wiring itself is
    checked by the aot_eager test above; the GPU check runs inductor on CUDA).
    """
    eager = _fit(_module(packed_views=True), steps=1, precision=EXACT)
    compiled = _fit(_module(packed_views=True, compile=True), steps=1, precision=EXACT)
    _assert_same_run(compiled, eager, tol=1e-5)


# --------------------------------------------------------------------------------------
# GPU (benchmarks/gpu_check.sh)
# --------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_fused_adamw_and_bf16_step():
    model = _fit(_module(), accelerator="gpu", precision="bf16-mixed")
    opt = model.configure_optimizers()
    assert opt.defaults["fused"] is True
    for anchors, _, loss in model.dtypes:
        assert anchors == torch.bfloat16 and loss == torch.float32
    assert all(torch.isfinite(loss) for loss in model.losses)


@pytest.mark.cuda
def test_cuda_packed_equals_separate():
    eager = _fit(_module(), accelerator="gpu", precision=EXACT)
    packed = _fit(_module(packed_views=True), accelerator="gpu", precision=EXACT)
    _assert_same_run(packed, eager, tol=1e-5)


@pytest.mark.cuda
def test_cuda_inductor_compiled_step_matches_eager():
    eager = _fit(_module(packed_views=True), accelerator="gpu", precision=EXACT)
    compiled = _fit(_module(packed_views=True, compile=True), accelerator="gpu", precision=EXACT)
    _assert_same_run(compiled, eager, tol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("packed", [False, True])
def test_cuda_bf16_anchor_pass_runs_on_flash_attention(packed):
    """Restricted to the flash kernel alone, SDPA raises on any call flash cannot serve, so a bf16
    anchor forward and backward that pass ran every attention on flash (separate views, and the
    packed segments); they equal the math kernel's up to bf16 rounding."""
    data = RandomViews()
    views = [torch.stack([data[i][0][v] for i in range(B)]).cuda() for v in range(1, len(VIEWS))]

    def anchor_pass(backend: SDPBackend) -> tuple[torch.Tensor, torch.Tensor]:
        model = _module(packed_views=packed).cuda()  # same weights and mask draws every time
        with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(backend):
            z = model.anchor_projections(views).float()
        z.square().sum().backward()  # the kernel's own backward, chosen in the forward
        return z.detach(), model.encoder.blocks[0].attn.qkv.weight.grad

    z_flash, grad_flash = anchor_pass(SDPBackend.FLASH_ATTENTION)
    z_math, grad_math = anchor_pass(SDPBackend.MATH)
    torch.testing.assert_close(z_flash, z_math, rtol=0.05, atol=0.05)
    assert (grad_flash - grad_math).norm() <= 0.05 * grad_math.norm()


@pytest.mark.cuda
def test_cuda_fsdp_single_gpu_step():
    """The FSDP wiring (root-unit EMA gather, sharded clipping) on one GPU: the EMA target moves."""
    from lightning.pytorch.strategies import FSDPStrategy
    from timm.models.vision_transformer import Block

    from msn.head import ProjectionHead

    model = _module()
    start = model.target_encoder.cls_token.detach().clone()
    strategy = FSDPStrategy(auto_wrap_policy={Block, ProjectionHead})
    _fit(model, accelerator="gpu", strategy=strategy)
    assert all(torch.isfinite(loss) for loss in model.losses)
    assert not torch.equal(model.target_encoder.cls_token.detach().cpu(), start)


def test_weight_decay_groups_survive_fsdp_style_flattening_and_wrapper_names():
    """Under FSDP every parameter is a 1-D shard and nested units add ``_fsdp_wrapped_module.``
    to the names; the decay groups must still be those of the unwrapped module."""

    def groups(model):
        names = {id(p): name for name, p in model.named_parameters()}
        return [[names[id(p)] for p in g["params"]] for g in model.configure_optimizers().param_groups]

    expected = groups(_module())

    class Unit(torch.nn.Module):  # what FSDP's auto-wrapping puts around a Block
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._fsdp_wrapped_module = inner

        def forward(self, x):
            return self._fsdp_wrapped_module(x)

    model = _module()
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.flatten()  # a shard is a 1-D view
    model.encoder.blocks[0] = Unit(model.encoder.blocks[0])
    got = [[name.replace("_fsdp_wrapped_module.", "") for name in g] for g in groups(model)]
    assert got == expected
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.pos_embed"} <= set(got[0])
    assert "encoder.blocks.0.norm1.weight" in got[1] and got[2] == ["prototypes"]


def _throughput_script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("msn_benchmark_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("packed", [False, True])
def test_benchmark_flop_formula_matches_torch_flop_counter(packed):
    """The analytic FLOPs of benchmarks/throughput.py against torch's own count of one forward."""
    bench = _throughput_script()
    cfg = bench.parse(
        ["model=vit_nano", "img=16", "patch=4", "chans=1", "focal=8", "focal_views=3", "batch=4"]
    )
    cfg.mask, cfg.head_hidden, cfg.head_out, cfg.prototypes = 0.25, 64, 32, 20
    model, _ = bench.build(cfg, torch.device("cpu"), packed="segments" if packed else False)
    views = bench.synthetic_views(cfg, torch.device("cpu"))
    # The math attention backend runs as matmuls, which the counter sees (fused CPU kernels not).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        z_t = model.target_projections(views[0])
        z_a = model.anchor_projections(views[1:])
        model.criterion(z_a, z_t, model.prototypes)
    size = backbone.VIT_SIZES["vit_nano"]
    flops = bench.step_flops_per_image(cfg, size.embed_dim, size.depth)
    expected = cfg.batch * (flops["student"] + flops["teacher"])
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-6)


def _tiny_benchmark():
    """benchmarks/throughput.py and a config of it with a ViT-nano on 16 px views, 2 focal views."""
    bench = _throughput_script()
    cfg = bench.parse(
        ["model=vit_nano", "img=16", "patch=4", "chans=1", "focal=8", "focal_views=2", "batch=4"]
    )
    cfg.head_hidden, cfg.head_out, cfg.prototypes = 64, 32, 20
    return bench, cfg


def test_benchmark_official_style_step_computes_what_our_step_computes():
    """The ``official`` variant of benchmarks/throughput.py (default AdamW, the EMA as a Python
    loop) must be the same iteration as our step, or its speed ratio would compare unlike work.
    (On a CPU both run the same AdamW, so this checks the EMA loop and the wiring.)"""
    bench, cfg = _tiny_benchmark()
    runs = []
    for official in (True, False):
        model, opt = bench.build(cfg, torch.device("cpu"), packed=False, fused=False if official else "auto")
        model.double()  # in place: the optimizer keeps its parameters (see EXACT above)
        views = [v.double() for v in bench.synthetic_views(cfg, torch.device("cpu"))]
        step = bench.make_step(model, opt, views, False, official)
        runs.append(([float(step()) for _ in range(3)], model.state_dict()))
    (loss_a, state_a), (loss_b, state_b) = runs
    assert loss_a == pytest.approx(loss_b, rel=1e-9)
    assert loss_a[0] != pytest.approx(loss_a[2], rel=1e-3)  # the steps changed the model
    for name, p in state_a.items():
        torch.testing.assert_close(p, state_b[name], rtol=1e-9, atol=1e-12, msg=name)


OPTIMIZER = "optimizer, clipping and EMA"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT", "matmul"),
        ("aten::addmm", "matmul"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Traits>", "attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("void at::native::multi_tensor_apply_kernel<Metadata<4>, FusedAdamMathFunctor>", OPTIMIZER),
        ("aten::_foreach_lerp_", OPTIMIZER),
        ("triton_per_fused_native_layer_norm_native_layer_norm_backward_0", "other"),
        ("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>", "other"),
    ],
)
def test_benchmark_profile_categories(name, expected):
    assert _throughput_script().category(name) == expected


def test_benchmark_profile_of_a_cpu_step():
    bench, cfg = _tiny_benchmark()
    model, opt = bench.build(cfg, torch.device("cpu"), packed=False)
    prof = bench.profile_steps(
        bench.make_step(model, opt, bench.synthetic_views(cfg, torch.device("cpu")), False),
        2,
        torch.device("cpu"),
    )
    assert sum(prof["shares"].values()) == pytest.approx(1.0)
    assert prof["shares"]["matmul"] > 0.1 and prof["shares"]["attention"] > 0  # a ViT step
    names = [name for name, _, _ in prof["top"]]
    assert "aten::mm" in names and prof["steps"] == 2
    with pytest.raises(SystemExit, match="profile='compile-packed-bf16' is not one of the variants run"):
        bench.parse(["variants=official,eager-packed-fp32", "profile=compile-packed-bf16"])
    with pytest.raises(SystemExit, match="variant 'fast' is unknown"):
        bench.parse(["variants=official,fast"])
