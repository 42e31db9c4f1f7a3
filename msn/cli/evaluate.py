"""Evaluate or fine-tune a pre-trained MSN checkpoint (``python finetune.py`` / ``msn-finetune``).

``mode=lowshot``: the official low-shot protocol on frozen target-encoder features, with the
random-init and raw-pixel baselines in the same table. ``mode=knn``: weighted kNN (DINO) on all
labelled training images. ``mode=linear``: the official linear probe (LayerNorm, L2 norm, Linear;
SGD nesterov, cosine) on all labels. ``mode=finetune``: full fine-tuning with the MAE recipe
(:mod:`msn.eval.finetune`), on all labels or a percent / k-per-class subset.

``ckpt`` may be any checkpoint :func:`msn.io.read_checkpoint` reads: ours, an official
``.pth.tar``, a Hugging Face ViTMSN folder or timm weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from msn.backbone import FEATURE_KINDS
from msn.cli.common import hydra_entry, resolve_device
from msn.eval.features import FeatureCache, file_fingerprint
from msn.eval.finetune import check_finetune_config, finetune_summary, run_finetune
from msn.eval.reports import FINETUNED_ROW, MSN_ROW, knn_report, linear_report, lowshot_from_config
from msn.io.formats import Checkpoint, read_checkpoint
from msn.io.load import msn_module
from msn.module import MSNModule
from msn.training.config import ConfigError

log = logging.getLogger("msn")
MODES = ("lowshot", "knn", "linear", "finetune")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", strict: bool = True) -> MSNModule:
    """An :class:`MSNModule` (eval mode) holding the encoders of any supported checkpoint.

    Our pre-training checkpoints load completely; official, HF and timm ones fill both encoders
    (and head / prototypes when they have them), see :func:`msn.io.msn_module`.

    Raises:
        FileNotFoundError: no file or folder at ``path``.
        ValueError: unreadable, or not a supported checkpoint (with what it does contain).
    """
    return msn_module(read_checkpoint(path), device, strict=strict)


def eval_datamodule(data_cfg: DictConfig, ckpt: Checkpoint) -> Any:
    """The data module of ``data_cfg`` for evaluating ``ckpt``: at the resolution its encoder was
    pre-trained at, after checking that the channel counts agree (ConfigError if not)."""
    encoder = ckpt.encoder_kwargs
    if data_cfg.in_chans != encoder["in_chans"]:
        raise ConfigError(
            [
                f"data.in_chans={data_cfg.in_chans} but the checkpoint's encoder takes "
                f"{encoder['in_chans']} channels"
            ]
        )
    return instantiate(data_cfg, eval_img_size=encoder["img_size"], _convert_="all")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation ``cfg.mode`` on ``cfg.ckpt``; returns the printed table and paths."""
    if cfg.mode not in MODES:
        raise ConfigError([f"mode={cfg.mode!r} is not available; allowed: {', '.join(MODES)}"])
    device = resolve_device(cfg.device)
    if cfg.features is not None and cfg.features not in FEATURE_KINDS:
        raise ConfigError([f"features={cfg.features!r} is unknown; allowed: {', '.join(FEATURE_KINDS)}"])
    if cfg.mode == "finetune" and (problems := check_finetune_config(cfg.finetune)):
        raise ConfigError(problems)
    ckpt = read_checkpoint(cfg.ckpt)
    datamodule = eval_datamodule(cfg.data, ckpt)
    train_ds, test_ds = datamodule.eval_datasets()  # ValueError with a clear message if unlabeled
    output_dir = Path(cfg.output_dir)
    if cfg.mode == "finetune":
        result = run_finetune(
            ckpt,
            datamodule,
            cfg.finetune,
            seed=cfg.seed,
            accelerator=device.type,
            output_dir=output_dir,
            strict=cfg.strict,
        )
        table = finetune_summary(result, cfg.data.name)
        _report(table, output_dir)
        return {"output_dir": str(output_dir), "report": table, "result": result}
    model = msn_module(ckpt, device, strict=cfg.strict)
    if cfg.features is not None:
        model.feature_kind = cfg.features
    cache = None
    if cfg.cache_dir:
        # Everything that determines the features; loader settings (workers, batch) do not.
        data = OmegaConf.to_container(cfg.data, resolve=True)
        for key in ("batch_size", "num_workers", "pin_memory", "persistent_workers", "transform"):
            data.pop(key, None)
        fingerprint = {
            "ckpt": file_fingerprint(ckpt.weights_file),
            "data": data,
            "eval_img_size": ckpt.encoder_kwargs["img_size"],
            "features": model.feature_kind,
            "seed": cfg.seed,
            "sizes": [len(train_ds), len(test_ds)],
        }
        cache = FeatureCache(cfg.cache_dir, fingerprint)
    if cfg.mode == "linear":
        table = linear_report(
            model,
            train_ds,
            test_ds,
            cfg.linear,
            dataset=cfg.data.name,
            seed=cfg.seed,
            device=device,
            output_dir=output_dir,
            cache=cache,
        )
    elif cfg.mode == "knn":
        table = knn_report(
            model, train_ds, test_ds, cfg.knn, dataset=cfg.data.name, output_dir=output_dir, cache=cache
        )
    else:
        table = lowshot_from_config(
            model,
            train_ds,
            test_ds,
            cfg.lowshot,
            dataset=cfg.data.name,
            seed=cfg.seed,
            output_dir=output_dir,
            cache=cache,
            # A fine-tuned checkpoint's encoder has seen labels: its row must not read as MSN's.
            name=FINETUNED_ROW if ckpt.format == "finetuned" else MSN_ROW,
        )
    _report(table, output_dir)
    return {"output_dir": str(output_dir), "report": table}


def _report(table: str, output_dir: Path) -> None:
    # Logged, not printed: the run's log file (finetune.log) keeps the table too.
    log.info("\n%s\nresults in %s", table, output_dir)


def main() -> None:
    """Console-script entry (``msn-finetune``); same as ``python finetune.py``."""
    hydra_entry("finetune", evaluate)()
