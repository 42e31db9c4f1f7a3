"""Evaluate a pre-trained MSN checkpoint (``python finetune.py`` / ``msn-finetune``).

``mode=lowshot``: the official low-shot protocol on frozen target-encoder features, with the
random-init and raw-pixel baselines in the same table. ``mode=knn``: weighted kNN (DINO) on all
labelled training images. ``mode=linear``: the official linear probe (LayerNorm, L2 norm, Linear;
SGD nesterov, cosine) on all labels.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from msn.backbone import FEATURE_KINDS
from msn.config import ConfigError
from msn.evaluate import knn_report, linear_report, lowshot_from_config
from msn.feature_cache import FeatureCache, file_fingerprint
from msn.module import MSNModule
from msn.train import CONFIG_DIR

log = logging.getLogger("msn")
MODES = ("lowshot", "knn", "linear")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> MSNModule:
    """Load an :class:`MSNModule` from a Lightning checkpoint written by ``train.py``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a checkpoint of this project (with what it does contain).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={str(path)!r}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"ckpt={str(path)!r} is not a readable PyTorch checkpoint ({err})") from err
    keys = set(state.get("state_dict", {})) if isinstance(state, dict) else set()
    if not {"prototypes", "target_encoder.cls_token"} <= keys or "hyper_parameters" not in state:
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"ckpt={str(path)!r} is not an msn-lightning pre-training checkpoint (expected a Lightning "
            f"checkpoint with target_encoder.* and prototypes; found {found})"
        )
    model = MSNModule(**state["hyper_parameters"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["device=cuda but no CUDA device is available; use device=cpu or device=auto"])
    return torch.device(name)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation ``cfg.mode`` on ``cfg.ckpt``; returns the printed table and paths."""
    if cfg.mode not in MODES:
        raise ConfigError([f"mode={cfg.mode!r} is not available; allowed: {', '.join(MODES)}"])
    device = resolve_device(cfg.device)
    if cfg.features is not None and cfg.features not in FEATURE_KINDS:
        raise ConfigError([f"features={cfg.features!r} is unknown; allowed: {', '.join(FEATURE_KINDS)}"])
    model = load_checkpoint(cfg.ckpt, device)
    if cfg.features is not None:
        model.feature_kind = cfg.features
    encoder = model.hparams.encoder
    if cfg.data.in_chans != encoder["in_chans"]:
        raise ConfigError(
            [
                f"data.in_chans={cfg.data.in_chans} but the checkpoint's encoder takes "
                f"{encoder['in_chans']} channels"
            ]
        )
    # Evaluate at the resolution the encoder was pre-trained at.
    datamodule = instantiate(cfg.data, eval_img_size=encoder["img_size"], _convert_="all")
    train_ds, test_ds = datamodule.eval_datasets()  # ValueError with a clear message if unlabeled
    output_dir = Path(cfg.output_dir)
    cache = None
    if cfg.cache_dir:
        # Everything that determines the features; loader settings (workers, batch) do not.
        data = OmegaConf.to_container(cfg.data, resolve=True)
        for key in ("batch_size", "num_workers", "pin_memory", "persistent_workers", "transform"):
            data.pop(key, None)
        fingerprint = {
            "ckpt": file_fingerprint(cfg.ckpt),
            "data": data,
            "eval_img_size": encoder["img_size"],
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
        )
    print("\n" + table, flush=True)
    return {"output_dir": str(output_dir), "report": table}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="finetune")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console-script entry (``msn-finetune``); same as ``python finetune.py``."""
    _hydra_main()
