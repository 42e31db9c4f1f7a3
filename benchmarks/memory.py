"""Peak memory per image of one MSN training step, activation checkpointing off and on.

Usage (``key=value`` overrides, as in ``benchmarks/throughput.py``)::

    python benchmarks/memory.py                          # ViT-S/16, official views, batches 4 and 8
    python benchmarks/memory.py batches=32,64 steps=3    # on a GPU
    python benchmarks/memory.py model=vit_tiny batches=8,16 malloc=default

``grad_checkpointing=on`` is ``model.encoder.grad_checkpointing=true``: the anchor encoder's blocks
keep only their inputs and recompute the rest in the backward pass. One step is what
``MSNModule`` does per batch: target projections (no grad), anchor projections (1 masked 224 px
view + the focal views), MSN loss, backward, clipping, AdamW, EMA; synthetic views made once.

Every (config, batch) runs in a fresh subprocess, since a process's peak RSS cannot be reset.
Peak = the high-water mark over ``steps`` steps minus the memory held before the first one
(model, target copy, views): on CUDA ``torch.cuda.max_memory_allocated`` minus
``memory_allocated``; on a CPU (torch's CPU allocator keeps no statistics) ``ru_maxrss`` minus the
resident set size, with glibc's mmap threshold fixed at 64 KiB (``malloc=fixed``, the default):
glibc otherwise raises the threshold as large blocks are freed, then serves tensors from the
heap, which keeps freed memory resident, so the RSS peak would count dead activations (measured
on ViT-Ti: 45 instead of 10 MB per image with checkpointing). With the threshold fixed every
tensor over 64 KiB is its own mapping, unmapped when freed, and the RSS peak tracks the live
bytes. The optimizer state (allocated in the first step) and the allocator's slack
are a fixed cost, so MB per image is the slope between two batch sizes,
``(peak(b2) - peak(b1)) / (b2 - b1)``: what each extra image costs, i.e. the activations.
Step seconds: wall clock and CPU time (all threads of the process; unlike the wall clock, not
inflated by other processes on the same cores) of the last step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.keyvalue import dataclass_defaults, parse_key_values  # noqa: E402
from msn.ema import ema_update_  # noqa: E402
from msn.module import MSNModule  # noqa: E402


@dataclasses.dataclass
class Config:
    model: str = "vit_small"
    img: int = 224
    patch: int = 16
    chans: int = 3
    focal: int = 96
    focal_views: int = 10
    mask: float = 0.15
    head_hidden: int = 2048
    head_out: int = 256
    prototypes: int = 1024
    batches: str = "4,8"
    configs: str = "off,on"  # grad_checkpointing values
    steps: int = 2
    threads: int = 0  # 0: torch's default
    device: str = "auto"
    malloc: str = "fixed"  # fixed: MALLOC_MMAP_THRESHOLD_=65536 for the CPU runs (docstring); default
    # Set by the parent for one measurement in a subprocess.
    child: str = ""  # "<off|on>:<batch>"


def parse(argv: list[str]) -> Config:
    return Config(**parse_key_values(argv, dataclass_defaults(Config)))


def device_of(cfg: Config) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def rss_mb() -> float:
    """Resident set size now (Linux ``/proc``; the peak so far elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(cfg: Config, checkpointing: bool, batch: int) -> dict[str, float]:
    """Peak memory (MB over what is held before the first step) and time of one step."""
    device = device_of(cfg)
    torch.manual_seed(0)
    model = MSNModule(
        encoder={
            "arch": cfg.model,
            "patch_size": cfg.patch,
            "img_size": cfg.img,
            "in_chans": cfg.chans,
            "grad_checkpointing": checkpointing,
        },
        head={"hidden_dim": cfg.head_hidden, "out_dim": cfg.head_out},
        num_prototypes=cfg.prototypes,
        mask_ratio=cfg.mask,
        mask_seed=0,
    ).to(device)
    opt = model.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    sizes = [cfg.img, cfg.img] + [cfg.focal] * cfg.focal_views
    views = [torch.randn(batch, cfg.chans, s, s, generator=g).to(device) for s in sizes]
    params = [*model.encoder.parameters(), *model.head.parameters()]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    else:
        base = rss_mb()
    for _ in range(cfg.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        z_t = model.target_projections(views[0])
        z_a = model.anchor_projections(views[1:])
        loss = model.criterion(z_a, z_t, model.prototypes).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        ema_update_(model.target_encoder, model.encoder, 0.996)
        ema_update_(model.target_head, model.head, 0.996)
        if cuda:
            torch.cuda.synchronize(device)
        step_s, step_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"base_mb": base, "peak_mb": peak - base, "step_s": step_s, "step_cpu_s": step_cpu_s,
            "loss": float(loss.detach())}  # fmt: skip


def run_child(cfg: Config, flag: str, batch: int) -> dict[str, float]:
    """One measurement in a fresh interpreter (its peak RSS starts from nothing)."""
    args = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(Config) if f.name != "child"]
    cmd = [sys.executable, __file__, *args, f"child={flag}:{batch}"]
    env = dict(os.environ)
    if cfg.malloc == "fixed" and device_of(cfg).type == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # a fixed value also turns off glibc's dynamic one
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    cfg = parse(argv)
    if cfg.malloc not in ("fixed", "default"):
        raise SystemExit(f"malloc={cfg.malloc!r} is unknown; allowed: fixed, default")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.child:
        flag, batch = cfg.child.split(":")
        print(json.dumps(measure(cfg, flag == "on", int(batch))))
        return
    device = device_of(cfg)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    metric = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss"
    print(f"# device: {device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"peak: {metric} minus the memory held before the first step")  # fmt: skip
    print(f"# config: {dataclasses.asdict(cfg)}")
    batches = sorted(int(b) for b in cfg.batches.split(","))
    print("| grad_checkpointing | batch | peak MB | MB per image | step s (wall) | step CPU-s |")
    print("|---|---:|---:|---:|---:|---:|")
    start = time.perf_counter()
    slopes = {}
    for flag in cfg.configs.split(","):
        rows = {b: run_child(cfg, flag, b) for b in batches}
        lo, hi = batches[0], batches[-1]
        slope = (rows[hi]["peak_mb"] - rows[lo]["peak_mb"]) / (hi - lo) if hi > lo else float("nan")
        slopes[flag] = (slope, rows[hi]["step_cpu_s"])
        for b in batches:
            r, per_image = rows[b], f"{slope:,.1f}" if b == hi else ""
            cells = f"{r['peak_mb']:,.0f} | {per_image} | {r['step_s']:.2f} | {r['step_cpu_s']:.2f}"
            print(f"| {flag} | {b} | {cells} |", flush=True)
        print(f"# {flag}: held before the first step {rows[hi]['base_mb']:,.0f} MB", flush=True)
    if {"off", "on"} <= set(slopes):
        (m_off, t_off), (m_on, t_on) = slopes["off"], slopes["on"]
        saving = 100 * (1 - m_on / m_off)
        print(f"# checkpointing: {m_on:,.1f} vs {m_off:,.1f} MB per image ({saving:.0f} % less), "
              f"step CPU time x{t_on / t_off:.2f} (batch {batches[-1]})")  # fmt: skip
    print(f"# whole run {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        raise SystemExit(__doc__)
    main(sys.argv[1:])
