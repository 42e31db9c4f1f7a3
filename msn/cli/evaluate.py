"""Evaluate or fine-tune a pre-trained MSN checkpoint (``python finetune.py`` / ``msn-finetune``).

``mode`` names one of the evaluations of configs/finetune.yaml, each built from its
configs/eval/<mode>.yaml: ``lowshot`` (the official low-shot protocol on frozen target-encoder
features, with the random-init and raw-pixel baselines in the same table), ``knn`` (weighted kNN,
DINO, on all labelled training images), ``linear`` (the official linear probe: LayerNorm, L2 norm,
Linear; SGD nesterov, cosine, on all labels) and ``finetune`` (full fine-tuning with the MAE recipe,
:mod:`msn.eval.finetune`, on all labels or a percent / k-per-class subset).

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

from msn.backbone import features_problems
from msn.checks import ConfigError
from msn.cli.common import hydra_entry, resolve_device
from msn.eval.reports import EvalRun, Evaluation, build_evaluation, evaluation_class
from msn.io.formats import Checkpoint, read_checkpoint
from msn.io.load import msn_module
from msn.module import MSNModule

log = logging.getLogger("msn")


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


def evaluation_modes(cfg: DictConfig) -> list[str]:
    """The modes ``cfg`` offers, in config order: its top-level nodes whose ``_target_`` is an
    :class:`~msn.eval.reports.Evaluation` (the ``eval@<mode>`` entries of its defaults)."""
    nodes = OmegaConf.to_container(cfg, resolve=False)
    return [
        key
        for key, node in nodes.items()  # type: ignore[union-attr]
        if isinstance(node, dict) and evaluation_class(node.get("_target_")) is not None
    ]


def build_mode(cfg: DictConfig) -> tuple[Evaluation, torch.device]:
    """The evaluation ``cfg.mode`` and the device, after checking them and ``cfg.features``:
    one ConfigError listing every problem, before anything is read."""
    problems: list[str] = []
    modes = evaluation_modes(cfg)
    if cfg.mode not in modes:
        problems.append(f"mode={cfg.mode!r} is not available; allowed: {', '.join(modes)}")
    device = torch.device("cpu")
    try:
        device = resolve_device(cfg.device)
    except ConfigError as err:
        problems += err.problems
    if cfg.features is not None:
        problems += features_problems(cfg.features)
    evaluation = None
    if cfg.mode in modes:
        try:
            evaluation = build_evaluation(cfg.mode, cfg[cfg.mode])
        except ConfigError as err:
            problems += err.problems
    if problems or evaluation is None:
        raise ConfigError(problems)
    return evaluation, device


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation ``cfg.mode`` on ``cfg.ckpt``; returns the printed report and the output dir."""
    evaluation, device = build_mode(cfg)
    ckpt = read_checkpoint(cfg.ckpt)
    datamodule = eval_datamodule(cfg.data, ckpt)
    train_ds, test_ds = evaluation.datasets(datamodule)  # ValueError with a clear message if unlabeled
    run = EvalRun(
        train_ds=train_ds,
        test_ds=test_ds,
        dataset=cfg.data.name,
        output_dir=Path(cfg.output_dir),
        seed=cfg.seed,
        device=device,
        checkpoint=ckpt,
        datamodule=datamodule,
        strict=cfg.strict,
        features=cfg.features,
        cache_dir=cfg.cache_dir,
        data=cfg.data,
    )
    table = evaluation(run)
    _report(table, run.output_dir)
    return {"output_dir": str(run.output_dir), "report": table}


def _report(table: str, output_dir: Path) -> None:
    # Logged, not printed: the run's log file (finetune.log) keeps the table too.
    log.info("\n%s\nresults in %s", table, output_dir)


def main() -> None:
    """Console-script entry (``msn-finetune``); same as ``python finetune.py``."""
    hydra_entry("finetune", evaluate)()
