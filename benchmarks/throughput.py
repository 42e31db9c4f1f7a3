"""Training throughput of one MSN step: images/s, peak memory and MFU, for several speed variants.

Usage (``key=value`` overrides, as on the train.py command line)::

    python benchmarks/throughput.py preset=cpu_small threads=1            # the shared small CPU config
    python benchmarks/throughput.py preset=vitb16 variants=all            # ViT-B/16, official views, on a GPU
    python benchmarks/throughput.py model=vit_small img=224 patch=16 focal=96 batch=64 mask=0.15
    python benchmarks/throughput.py preset=cpu_small mode=pipeline         # data pipeline images/s per core

``data=synthetic`` (the only kind): random normalised views made once on the device, so the
numbers measure the model step alone (``mode=pipeline`` measures the views' production).

One step is exactly what ``MSNModule`` does per batch: target projections (no grad), anchor
projections, MSN loss (float32), backward, clipping of encoder + head, AdamW, EMA of the target.
Variants are ``{eager,compile}-{separate,packed,packedmask}-{fp32,bf16}`` (``variants=all`` or
a comma list): ``compile`` is ``model.compile=true`` (inductor), ``packed`` is
``model.packed_views=true`` (per-view attention segments), ``packedmask`` is
``model.packed_views=mask`` (block-diagonal attention mask), ``bf16`` is autocast bf16
(``trainer.precision=bf16-mixed``). ``official`` is the step as the official code runs it: fp32,
separate views, eager, ``torch.optim.AdamW`` with its default (not fused) implementation and the
EMA as a Python loop over the parameters; when it is in the list, the last line gives the best
variant's images/s as a multiple of it.

``profile=VARIANT`` (one of those listed) profiles ``profile_steps`` more steps of that variant
with ``torch.profiler`` after timing it: the ops or kernels that took the most time, and the share
of the step in attention, matrix products, the optimizer and the rest (on a GPU: device time, and
how busy the device was over the wall time).

FLOPs (analytic, model FLOPs: what the math needs, not what a kernel happens to compute). With
width D, depth L, MLP ratio 4, a ViT forward over one view of T tokens (class token included) and
N patches of C x p x p pixels costs

    F_vit(T, N) = L * (24 * T * D^2 + 4 * T^2 * D) + 2 * N * C * p^2 * D

(per block: qkv 6TD^2, output projection 2TD^2, MLP 16TD^2, scores QK^T 2T^2 D, weighted sum
2T^2 D; plus the patch embedding). The head costs F_head = 2 (D H + H^2 + H O) per view and the
prototype logits 2 O K. For one image with an anchor view of ``keep + 1`` tokens (mask applied
after the patch embedding of all N patches), ``focal_views`` focal views of ``N_f + 1`` tokens and
the target view of ``N + 1`` tokens:

    student forward = F_vit(keep + 1, N) + focal_views * F_vit(N_f + 1, N_f)
                      + (1 + focal_views) * (F_head + 2 O K)
    teacher forward = F_vit(N + 1, N) + F_head + 2 O K
    step FLOPs      = 3 * student forward + teacher forward      (backward = 2 x forward)

Packed views count the same model FLOPs (the block-diagonal mask's masked pairs are waste, not
work), so MFU compares variants fairly. Normalisations, softmax, GELU, the loss and the
optimizer are not counted (they are memory-bound, a few % of the time at best).

MFU = step FLOPs x images/s / peak. The peak is measured here: the best FLOP/s of large square
``torch.mm`` products in the same dtype (fp32; bf16 for the bf16 variants), same device and same
threads. On GPUs the datasheet dense peak (bf16 tensor cores) is printed as well.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from benchmarks.keyvalue import dataclass_defaults, parse_key_values  # noqa: E402
from msn import backbone  # noqa: E402
from msn.ema import ema_update_  # noqa: E402
from msn.masking import num_kept  # noqa: E402
from msn.module import MSNModule  # noqa: E402


@dataclasses.dataclass
class Config:
    model: str = "vit_tiny"
    embed_dim: int = 0  # 0: the registry's value for ``model``
    depth: int = 0
    heads: int = 0
    img: int = 224
    patch: int = 16
    chans: int = 3
    focal: int = 96
    focal_views: int = 10
    batch: int = 64
    mask: float = 0.15
    head_hidden: int = 2048
    head_out: int = 256
    prototypes: int = 1024
    data: str = "synthetic"
    device: str = "auto"
    threads: int = 0  # 0: torch's default
    variants: str = "eager-separate-fp32,eager-packed-fp32,compile-separate-fp32,compile-packed-fp32"
    steps: int = 10
    warmup: int = 3
    mode: str = "step"  # step | pipeline | peak
    preset: str = ""
    profile: str = ""  # a variant to profile after timing it
    profile_steps: int = 3


PRESETS: dict[str, dict[str, object]] = {
    # The shared small CPU config: Fashion-MNIST-sized views, ViT width 192, depth 6, 3 heads.
    "cpu_small": dict(
        model="vit_tiny",
        embed_dim=192,
        depth=6,
        heads=3,
        img=28,
        patch=4,
        chans=1,
        focal=12,
        focal_views=10,
        batch=64,
        mask=0.15,
        head_hidden=1024,
        head_out=256,
        prototypes=1024,
    ),  # fmt: skip
    # ViT-B/16 with the official views (224 + 10 x 96, mask 0.3).
    "vitb16": dict(
        model="vit_base",
        img=224,
        patch=16,
        chans=3,
        focal=96,
        focal_views=10,
        batch=64,
        mask=0.3,
        head_hidden=2048,
        head_out=256,
        prototypes=1024,
    ),  # fmt: skip
}
# ViT-S/16: the same views, its own mask ratio (0.15).
PRESETS["vits16"] = {**PRESETS["vitb16"], "model": "vit_small", "mask": 0.15}

LAYOUTS = {"separate": False, "packed": "segments", "packedmask": "mask"}  # -> model.packed_views
ALL_VARIANTS = [f"{c}-{p}-{d}" for d in ("fp32", "bf16") for c in ("eager", "compile") for p in LAYOUTS]
OFFICIAL = "official"  # fp32, separate, eager, default AdamW, EMA loop: the official code's step

# Dense bf16 tensor-core peaks from the datasheets (TFLOP/s), for the GPU MFU column.
# The first name found in the device name wins (so "H100 PCIe" before "H100").
GPU_PEAK_TFLOPS = {
    "H100 PCIe": 756.5,
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "A10": 125.0,
}


def parse(argv: list[str]) -> Config:
    """``key=value`` arguments -> Config (a preset first, then the other keys on top of it)."""
    given = parse_key_values(argv, dataclass_defaults(Config))
    values: dict[str, object] = {}
    if given.get("preset"):
        if given["preset"] not in PRESETS:
            raise SystemExit(f"preset={given['preset']!r} is unknown; allowed: {list(PRESETS)}")
        values.update(PRESETS[given["preset"]])
    values.update(given)
    cfg = Config(**values)
    if cfg.warmup < 1:  # run_variant checks the loss of the warm-up steps before timing
        raise SystemExit(f"warmup={cfg.warmup}: at least 1 warm-up step")
    if cfg.data != "synthetic":
        raise SystemExit("data=synthetic is the only data of this benchmark (random views made once)")
    allowed = [*ALL_VARIANTS, OFFICIAL]
    for variant in variants_of(cfg):
        if variant not in allowed:
            raise SystemExit(f"variant {variant!r} is unknown; allowed: {allowed}")
    if cfg.profile and cfg.profile not in variants_of(cfg):
        raise SystemExit(f"profile={cfg.profile!r} is not one of the variants run: {variants_of(cfg)}")
    if cfg.profile_steps < 1:
        raise SystemExit(f"profile_steps={cfg.profile_steps}: at least 1 step")
    return cfg


def variants_of(cfg: Config) -> list[str]:
    return ALL_VARIANTS if cfg.variants == "all" else cfg.variants.split(",")


# ---------------------------------------------------------------------------------- FLOPs


def vit_flops(tokens: int, patches: int, dim: int, depth: int, patch: int, chans: int) -> float:
    """F_vit(T, N) of the module docstring: forward FLOPs of one view."""
    return depth * (24 * tokens * dim**2 + 4 * tokens**2 * dim) + 2 * patches * chans * patch**2 * dim


def step_flops_per_image(cfg: Config, dim: int, depth: int) -> dict[str, float]:
    """Student forward, teacher forward and step FLOPs for one image (module docstring)."""
    n = (cfg.img // cfg.patch) ** 2
    n_f = (cfg.focal // cfg.patch) ** 2
    keep = num_kept(n, cfg.mask) if cfg.mask > 0 else n
    head = 2 * (dim * cfg.head_hidden + cfg.head_hidden**2 + cfg.head_hidden * cfg.head_out)
    protos = 2 * cfg.head_out * cfg.prototypes
    vit = lambda t, p: vit_flops(t, p, dim, depth, cfg.patch, cfg.chans)  # noqa: E731
    student = vit(keep + 1, n) + cfg.focal_views * vit(n_f + 1, n_f) + (1 + cfg.focal_views) * (head + protos)
    teacher = vit(n + 1, n) + head + protos
    return {"student": student, "teacher": teacher, "step": 3 * student + teacher}


# ---------------------------------------------------------------------------------- peak


def measure_peak(device: torch.device, dtype: torch.dtype, seconds: float = 3.0) -> float:
    """Best FLOP/s of square matmuls (sizes 1024..4096 on CPU, 8192 on GPU) in ``dtype``.

    On a CPU per CPU-second of this process (all threads), i.e. the per-core peak times the
    threads, unaffected by other processes on the same cores; on a GPU per wall-clock second.
    """
    sizes = (8192,) if device.type == "cuda" else (1024, 2048, 4096)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up
        sync(device)
        end = time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < end:
            t0 = clock()
            torch.mm(a, b, out=out)
            sync(device)
            best = max(best, 2 * n**3 / max(clock() - t0, 1e-9))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------- step


def build(
    cfg: Config, device: torch.device, packed: bool | str, fused: bool | str = "auto"
) -> tuple[MSNModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    encoder = {"arch": cfg.model, "patch_size": cfg.patch, "img_size": cfg.img, "in_chans": cfg.chans}
    encoder.update(
        {k: v for k, v in (("embed_dim", cfg.embed_dim), ("depth", cfg.depth), ("num_heads", cfg.heads)) if v}
    )
    model = MSNModule(
        encoder=encoder,
        head={"hidden_dim": cfg.head_hidden, "out_dim": cfg.head_out},
        num_prototypes=cfg.prototypes,
        mask_ratio=cfg.mask,
        mask_seed=0,
        packed_views=packed,
        optim={"fused": fused},
    ).to(device)
    # The module's own optimizer: its parameter groups, fused AdamW once the model is on CUDA.
    return model, model.configure_optimizers()


def synthetic_views(cfg: Config, device: torch.device) -> list[torch.Tensor]:
    """Target, masked anchor, focal views: random normalised images, made once."""
    g = torch.Generator(device="cpu").manual_seed(0)
    sizes = [cfg.img, cfg.img] + [cfg.focal] * cfg.focal_views
    return [torch.randn(cfg.batch, cfg.chans, s, s, generator=g).to(device) for s in sizes]


def ema_loop_(target: torch.nn.Module, source: torch.nn.Module, momentum: float) -> None:
    """The official code's EMA: one multiply and one add per parameter, in a Python loop."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.mul_(momentum).add_((1.0 - momentum) * s.detach())


def make_step(
    model: MSNModule,
    opt: torch.optim.Optimizer,
    views: list[torch.Tensor],
    bf16: bool,
    official: bool = False,
) -> Callable[[], float]:
    device = views[0].device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    params = [*model.encoder.parameters(), *model.head.parameters()]
    ema = ema_loop_ if official else ema_update_

    def step() -> float:
        with autocast:
            z_t = model.target_projections(views[0])
            z_a = model.anchor_projections(views[1:])
            out = model.criterion(z_a, z_t, model.prototypes)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        ema(model.target_encoder, model.encoder, 0.996)
        ema(model.target_head, model.head, 0.996)
        return out.loss.detach()

    return step


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB


def run_variant(cfg: Config, device: torch.device, variant: str) -> dict[str, float]:
    official = variant == OFFICIAL
    mode, layout, precision = ("eager", "separate", "fp32") if official else variant.split("-")
    model, opt = build(cfg, device, packed=LAYOUTS[layout], fused=False if official else "auto")
    if mode == "compile":
        model.compile_encoders()
    step = make_step(model, opt, synthetic_views(cfg, device), bf16=precision == "bf16", official=official)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        loss = step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    if not math.isfinite(float(loss)):
        raise RuntimeError(f"{variant}: non-finite loss {float(loss)}")
    wall_s, cpu_s = timed(step, cfg.steps, device)
    result = {
        "images_s": cfg.batch / wall_s,
        "step_ms": 1e3 * wall_s,
        "images_cpu_s": cfg.batch / cpu_s,
        "step_cpu_s": cpu_s,
        "warmup_s": warmup_s,
        "mem_mb": peak_memory_mb(device),
    }
    if cfg.profile == variant:
        result["profile"] = profile_steps(step, cfg.profile_steps, device)  # type: ignore[assignment]
    return result


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """Median wall-clock and median CPU time (this process, all threads) of ``fn()``, in seconds.

    CPU time gives the per-core speed even when other processes share the core (the wall clock
    then also counts their turns); on a GPU only the wall clock is meaningful.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return sorted(wall)[repeats // 2], sorted(cpu)[repeats // 2]


# ---------------------------------------------------------------------------------- profile

# Op (CPU) or kernel (GPU) names -> where the step's time goes; the first pattern found wins.
# (Optimizer kernels first: "FusedAdamMathFunctor" holds an "mm".)
CATEGORIES = (
    ("attention", ("attention", "flash", "fmha", "sdpa", "softmax")),
    ("optimizer, clipping and EMA", ("adam", "foreach", "multi_tensor", "lerp")),
    ("matmul", ("gemm", "mm", "matmul", "linear", "xmma", "nvjet", "cutlass", "sm90", "conv")),
)


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


def profile_steps(step: Callable[[], object], steps: int, device: torch.device) -> dict[str, object]:
    """Time by category and the top entries of ``steps`` steps under ``torch.profiler``.

    On a GPU the entries are the device kernels (self device time); on a CPU the aten ops (self
    CPU time), so that nested ops are not counted twice.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall_us = 1e6 * (time.perf_counter() - t0)
    entries = []
    for evt in prof.key_averages():
        if device.type == "cuda":
            if evt.device_type != DeviceType.CUDA:
                continue
            us = evt.self_device_time_total
        else:
            if not evt.key.startswith("aten::"):
                continue
            us = evt.self_cpu_time_total
        if us > 0:
            entries.append((evt.key, us, evt.count))
    total = sum(us for _, us, _ in entries)
    shares: dict[str, float] = {cat: 0.0 for cat, _ in CATEGORIES} | {"other": 0.0}
    for name, us, _ in entries:
        shares[category(name)] += us / max(total, 1e-9)
    top = sorted(entries, key=lambda e: -e[1])[:15]
    return {
        "shares": shares,
        "top": top,
        "busy": total / wall_us,
        "step_ms": wall_us / 1e3 / steps,
        "steps": steps,
    }


def print_profile(variant: str, prof: dict[str, object], device_type: str) -> None:
    clock = "device time of the kernels" if device_type == "cuda" else "self CPU time of the aten ops"
    print(f"\n# profile of {variant}: {prof['step_ms']:,.1f} ms per step under the profiler; {clock}")
    if device_type == "cuda":
        print(f"# device busy {100 * prof['busy']:.0f} % of the wall time (the rest: launches, host work)")
    print("| share of the step | % |\n|---|---:|")
    for cat, share in prof["shares"].items():  # type: ignore[union-attr]
        print(f"| {cat} | {100 * share:.1f} |")
    print("\n| op or kernel | category | calls per step | ms per step |\n|---|---|---:|---:|")
    steps = prof["steps"]
    for name, us, count in prof["top"]:  # type: ignore[union-attr]
        short = name if len(name) <= 70 else name[:67] + "..."
        print(f"| `{short}` | {category(name)} | {count / steps:g} | {us / 1e3 / steps:,.2f} |")


# ---------------------------------------------------------------------------------- pipeline


def run_pipeline(cfg: Config) -> None:
    """Images/s per CPU core of the multi-view augmentation: PIL per image vs batched uint8."""
    from PIL import Image

    from msn.data.batched import BatchedMultiView
    from msn.data.transforms import MultiViewTransform

    kwargs = dict(rand_size=cfg.img, focal_size=cfg.focal, focal_views=cfg.focal_views, in_chans=cfg.chans)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (cfg.batch, cfg.chans, cfg.img, cfg.img), dtype=torch.uint8, generator=g)
    mode = "L" if cfg.chans == 1 else "RGB"
    pil = [Image.fromarray(im.permute(1, 2, 0).squeeze(-1).numpy(), mode) for im in images]
    per_image = MultiViewTransform(**kwargs)
    batched = BatchedMultiView(**kwargs)
    threads = torch.get_num_threads()
    for name, fn in (("PIL, per image (workers)", lambda: [per_image(im) for im in pil]),
                     ("batched uint8 (data.augment_on=device)", lambda: batched(images))):  # fmt: skip
        fn()
        wall_s, cpu_s = timed(fn, max(3, cfg.steps), torch.device("cpu"))
        print(f"| {name} | {threads} | {cfg.batch / wall_s:,.0f} | {cfg.batch / cpu_s:,.0f} |")


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    cfg = parse(sys.argv[1:] if argv is None else argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else cfg.device
        if cfg.device != "auto"
        else "cpu"
    )
    size = backbone.VIT_SIZES[cfg.model]
    dim, depth = cfg.embed_dim or size.embed_dim, cfg.depth or size.depth
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(f"# device: {device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"cpu cores visible {len(os.sched_getaffinity(0))}")  # fmt: skip
    print(f"# config: {dataclasses.asdict(cfg)}")
    if cfg.mode == "pipeline":
        print("| pipeline | threads | images/s (wall) | images per CPU-second |\n|---|---:|---:|---:|")
        run_pipeline(cfg)
        return
    flops = step_flops_per_image(cfg, dim, depth)
    print(
        f"# FLOPs per image: student forward {flops['student'] / 1e9:.3f} G, "
        f"teacher forward {flops['teacher'] / 1e9:.3f} G, step {flops['step'] / 1e9:.3f} G"
    )
    variants = variants_of(cfg)
    peaks = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if cfg.mode == "peak" or any(precision_of(v) == dtype_name for v in variants):
            peaks[dtype_name] = measure_peak(device, dtype)
            print(f"# measured {dtype_name} matmul peak: {peaks[dtype_name] / 1e9:,.1f} GFLOP/s")
    datasheet = (
        next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None) if device.type == "cuda" else None
    )
    if datasheet:
        print(f"# datasheet dense bf16 peak: {datasheet:,.1f} TFLOP/s")
    if cfg.mode == "peak":
        return
    print(table_header(device.type, datasheet is not None))
    results = {}
    for variant in variants:
        results[variant] = r = run_variant(cfg, device, variant)
        print(
            table_row(variant, r, flops["step"], peaks[precision_of(variant)], datasheet, device.type),
            flush=True,
        )
    if OFFICIAL in results and len(results) > 1:
        best = max((v for v in results if v != OFFICIAL), key=lambda v: results[v]["images_s"])
        top, base = results[best]["images_s"], results[OFFICIAL]["images_s"]
        print(
            f"\n# best variant {best}: {top:.1f} images/s, {top / base:.2f} x the official-style step "
            f"({base:.1f} images/s)"
        )
    for variant, r in results.items():
        if "profile" in r:
            print_profile(variant, r["profile"], device.type)  # type: ignore[arg-type]


def precision_of(variant: str) -> str:
    return "fp32" if variant == OFFICIAL else variant.split("-")[2]


def table_header(device_type: str, datasheet: bool) -> str:
    if device_type == "cpu":
        cols = [
            "variant",
            "images/s (wall)",
            "images per CPU-s",
            "step CPU-s",
            "GFLOP per CPU-s",
            "% of peak",
        ]
    else:
        cols = ["variant", "images/s", "step ms", "TFLOP/s", "MFU (measured peak)"]
        cols += ["MFU (datasheet)"] if datasheet else []
    cols += ["peak memory MiB", "first steps s"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def table_row(
    variant: str,
    r: dict[str, float],
    step_flops: float,
    peak: float,
    datasheet: float | None,
    device_type: str,
) -> str:
    if device_type == "cpu":
        # Per core: FLOPs per CPU-second of the process against the per-CPU-second matmul peak.
        achieved = step_flops * r["images_cpu_s"]
        cells = [
            variant,
            f"{r['images_s']:,.1f}",
            f"{r['images_cpu_s']:,.1f}",
            f"{r['step_cpu_s']:,.2f}",
            f"{achieved / 1e9:,.1f}",
            f"{100 * achieved / peak:.1f} %",
        ]
    else:
        achieved = step_flops * r["images_s"]
        cells = [variant, f"{r['images_s']:,.0f}", f"{r['step_ms']:,.1f}", f"{achieved / 1e12:,.1f}"]
        cells += [f"{100 * achieved / peak:.1f} %"]
        cells += [f"{100 * achieved / (datasheet * 1e12):.1f} %"] if datasheet else []
    cells += [f"{r['mem_mb']:,.0f}", f"{r['warmup_s']:,.1f}"]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        raise SystemExit(__doc__)
    main()
