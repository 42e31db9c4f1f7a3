"""``msn-export``: a checkpoint's encoder for other libraries (formats: :mod:`msn.io.export`).

msn-export ckpt=outputs/digits/<run>/checkpoints/last.ckpt format=hf out=exported/hf
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from msn.checks import ConfigError
from msn.cli.common import hydra_entry
from msn.io.export import official_checkpoint, save_hf, save_timm
from msn.io.formats import encoder_problems, read_checkpoint
from msn.io.load import build_encoder, data_stats

EXPORT_FORMATS = ("hf", "timm", "official")


def export(cfg: DictConfig) -> dict[str, Any]:
    """Run ``msn-export`` for a composed ``configs/export.yaml``; returns the written files."""
    problems = []
    if cfg.format not in EXPORT_FORMATS:
        problems.append(f"format={cfg.format!r} is unknown; allowed: {', '.join(EXPORT_FORMATS)}")
    problems += encoder_problems(cfg.encoder)
    if cfg.out in (None, "", "???"):
        problems.append("out=DIR is required (the folder, or for format=official a .pth.tar file)")
    if problems:
        raise ConfigError(problems)
    ckpt = read_checkpoint(cfg.ckpt, num_heads=cfg.num_heads)
    out = Path(str(cfg.out)).expanduser()
    if cfg.format == "official":
        if cfg.encoder is not None:
            ckpt.encoders = {cfg.encoder: ckpt.encoders[ckpt.encoder_state(cfg.encoder)[0]]}
        path = out if out.name.endswith(".pth.tar") else out / f"{Path(ckpt.source).stem}.pth.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(official_checkpoint(ckpt, strict=cfg.strict), path)
        written = [path]
    else:
        vit = build_encoder(ckpt, cfg.encoder, strict=cfg.strict)
        mean, std = data_stats(ckpt, cfg.mean, cfg.std)
        if cfg.format == "hf":
            written = save_hf(out, vit, ckpt.classifier, ckpt.id2label, mean, std)
        else:
            arch = ckpt.encoder_kwargs.get("arch", "vit_small")
            written = save_timm(out, vit, arch, ckpt.classifier, ckpt.id2label, mean, std)
    kind = "classifier" if ckpt.classifier is not None and cfg.format != "official" else "encoder"
    print(f"exported the {kind} of {ckpt.source} ({ckpt.format}) as {cfg.format}:", flush=True)
    for path in written:
        print(f"  {path}", flush=True)
    return {"format": cfg.format, "files": [str(p) for p in written], "source_format": ckpt.format}


def main() -> None:
    """Console-script entry (``msn-export``)."""
    hydra_entry("export", export)()


if __name__ == "__main__":
    main()
