"""trainer.precision=auto: bf16-mixed where the accelerator multiplies bf16 natively, else 32-true."""

from __future__ import annotations

import pytest
import torch

from msn.cli.train import train
from msn.training import precision
from msn.training.config import validate_config
from msn.training.precision import cpu_bf16_features, explain_precision, resolve_precision
from tests.helpers import FAST, composed


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Sets the CPU's ``/proc/cpuinfo`` flags; torch's own probes and CUDA see nothing."""

    def flags(*names: str) -> None:
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {' '.join(names)}\n\n")
        monkeypatch.setattr(precision, "_CPUINFO", str(info))

    for probe in precision._TORCH_PROBES.values():
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    return flags


@pytest.mark.parametrize("flags", [("avx512_bf16",), ("amx_bf16", "amx_tile"), ("avx512_bf16", "amx_bf16")])
def test_auto_is_bf16_mixed_on_a_cpu_with_native_bf16(cpu, flags):
    cpu(*flags)
    assert cpu_bf16_features() == sorted(set(flags) & {"avx512_bf16", "amx_bf16"})
    for accelerator in ("cpu", "auto"):  # auto: no CUDA here, so the CPU
        assert resolve_precision("auto", accelerator) == "bf16-mixed"
    assert "native bf16" in explain_precision("auto", "cpu")[1]


def test_auto_is_32_true_on_a_cpu_without_native_bf16(cpu):
    cpu("avx512f", "avx512bw")  # AVX-512 without its BF16 extension: emulated
    assert cpu_bf16_features() == []
    assert explain_precision("auto", "cpu") == (
        "32-true",
        "the CPU has neither avx512_bf16 nor amx_bf16: bf16 would be emulated",
    )


def test_torch_probes_count_when_cpuinfo_says_nothing(cpu, monkeypatch):
    cpu()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_bf16_features() == ["amx_bf16"]


def _cuda(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], supported: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Some GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: supported)


@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_auto_on_cuda_needs_compute_capability_8(monkeypatch, cpu, accelerator):
    cpu("avx512_bf16")  # ignored: the GPU trains
    _cuda(monkeypatch, (8, 0), supported=True)
    assert explain_precision("auto", accelerator) == (
        "bf16-mixed",
        "Some GPU, compute capability 8.0: native bf16",
    )
    _cuda(monkeypatch, (7, 5), supported=False)  # Turing: bf16 only emulated
    assert explain_precision("auto", accelerator) == (
        "32-true",
        "Some GPU, compute capability 7.5 < 8.0: no native bf16",
    )
    # accelerator=cpu on a GPU machine: the CPU decides
    assert resolve_precision("auto", "cpu") == "bf16-mixed"


def test_other_values_are_kept_and_other_accelerators_stay_float32(cpu):
    cpu("amx_bf16")
    assert resolve_precision("16-mixed", "cpu") == "16-mixed"
    assert resolve_precision("32-true", "cpu") == "32-true"
    assert resolve_precision("auto", "mps") == "32-true"


def test_auto_validates_and_trains_one_step(tmp_path, monkeypatch, capsys):
    # This machine's own CPU flags are not what the test is about: no native bf16 here.
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: [])
    overrides = (*FAST, "trainer.max_steps=1", "lowshot.enabled=false", f"output_dir={tmp_path}")
    cfg = composed("train", *overrides, "trainer=cpu", "trainer.precision=auto")
    validate_config(cfg)
    result = train(cfg)
    out = capsys.readouterr().out
    assert "  compute  auto -> 32-true, strategy auto, cpu" in out
    assert "precision: trainer.precision=auto -> 32-true (the CPU has neither" in out
    state = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=True)
    assert state["global_step"] == 1
    # The CPU recipes ask for auto (digits and fmnist_cpu use trainer=cpu).
    for experiment in ("digits", "fmnist_cpu"):
        assert composed("train", f"experiment={experiment}").trainer.precision == "auto"
