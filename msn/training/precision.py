"""``trainer.precision=auto``: bf16 mixed precision where the hardware multiplies bf16 natively,
else float32 (the official precision).

Resolved in the launching process before the Trainer is built (Lightning itself has no ``auto``).
Native bf16 means: a CUDA GPU of compute capability 8.0 or newer (Ampere, Hopper, ...), or a CPU
with AVX512-BF16 or AMX. Elsewhere bf16 is emulated, slower than float32 and less exact, so
``auto`` keeps float32.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["AUTO", "cpu_bf16_features", "explain_precision", "resolve_accelerator", "resolve_precision"]

#: The value of ``trainer.precision`` resolved here.
AUTO = "auto"
NATIVE = "bf16-mixed"
FALLBACK = "32-true"
#: ``/proc/cpuinfo`` flags of native bf16 matrix instructions (x86).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
_CPUINFO = "/proc/cpuinfo"
# torch's own CPU probes (cpuinfo library, any OS; private, hence looked up defensively). Every
# AMX CPU so far has AMX-BF16 with its AMX tiles.
_TORCH_PROBES = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
_MIN_CAPABILITY = (8, 0)


def _cpuinfo_flags() -> set[str]:
    """The ``flags`` of ``/proc/cpuinfo`` (empty where there is no such file)."""
    if not os.path.isfile(_CPUINFO):
        return set()
    with open(_CPUINFO) as f:
        return {w for line in f if line.startswith("flags") for w in line.partition(":")[2].split()}


def cpu_bf16_features() -> list[str]:
    """The native bf16 features of this CPU among :data:`BF16_CPU_FLAGS` (empty: bf16 is emulated)."""
    found = _cpuinfo_flags() & set(BF16_CPU_FLAGS)
    for flag, name in _TORCH_PROBES.items():
        probe = getattr(torch.cpu, name, None)
        if probe is not None and probe():
            found.add(flag)
    return sorted(found)


def resolve_accelerator(accelerator: Any) -> str:
    """The device kind Lightning will train on: ``cuda``, ``mps``, ``cpu`` or another name.

    ``auto`` and ``gpu`` pick as Lightning does: CUDA when available, else MPS (``auto``: else CPU).
    """
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__
    name = name.lower().removesuffix("accelerator") or "auto"
    if name in ("auto", "gpu"):
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu" if name == "auto" else "gpu"
    return name


def _cuda_bf16() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    # The weakest of the visible GPUs decides (they all run the same program). This initialises
    # CUDA in this process, which fork-based strategies (ddp_fork, ddp_notebook) refuse.
    capability = min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
    name = torch.cuda.get_device_name()
    try:
        supported = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no emulation flag
        supported = torch.cuda.is_bf16_supported()
    cc = ".".join(map(str, capability))
    if capability >= _MIN_CAPABILITY and supported:
        return True, f"{name}, compute capability {cc}: native bf16"
    return False, f"{name}, compute capability {cc} < 8.0: no native bf16"


def _cpu_bf16() -> tuple[bool, str]:
    features = cpu_bf16_features()
    if features:
        return True, f"the CPU has {' and '.join(features)}: native bf16"
    return False, f"the CPU has neither {' nor '.join(BF16_CPU_FLAGS)}: bf16 would be emulated"


def explain_precision(value: Any, accelerator: Any) -> tuple[str, str]:
    """``(precision, why)``: what ``trainer.precision=value`` becomes for ``accelerator`` (the
    ``trainer.accelerator`` value) and one phrase saying why; anything but ``auto`` is kept."""
    if str(value) != AUTO:
        return str(value), "as configured"
    device = resolve_accelerator(accelerator)
    if device == "cuda":
        native, why = _cuda_bf16()
    elif device == "cpu":
        native, why = _cpu_bf16()
    else:  # MPS, XLA, ...: not probed; float32 is the official precision
        native, why = False, f"accelerator {device}: bf16 support is not probed there"
    return (NATIVE if native else FALLBACK), why


def resolve_precision(value: Any, accelerator: Any) -> str:
    """``trainer.precision`` as Lightning takes it: ``auto`` becomes ``bf16-mixed`` where
    ``accelerator`` multiplies bf16 natively, else ``32-true``; any other value is kept."""
    return explain_precision(value, accelerator)[0]
