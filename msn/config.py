"""Validation of the resolved training config, before anything is built or computed.

Every rule names the key, the bad value and what is allowed, and all problems are reported at
once, so a user fixes a config in one go instead of one crash at a time (possibly hours in).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from msn.backbone import PATCH_SIZES, VIT_SIZES
from msn.masking import MASK_MODES

DATASET_NAMES = ("digits", "fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder")


class ConfigError(ValueError):
    """The config is invalid; ``problems`` lists every rule it breaks."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of a resolved train config."""
    problems: list[str] = []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    arch = _get(cfg, "model.encoder.arch")
    check(arch in VIT_SIZES, f"model.encoder.arch={arch!r} is unknown; allowed: {', '.join(VIT_SIZES)}")
    patch = _get(cfg, "model.encoder.patch_size")
    check(patch in PATCH_SIZES, f"model.encoder.patch_size={patch} is not supported; allowed: {PATCH_SIZES}")

    ratio = _get(cfg, "model.mask_ratio")
    check(
        isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0,
        f"model.mask_ratio={ratio} must be a number in [0, 1)",
    )
    mode = _get(cfg, "model.mask_mode")
    check(mode in MASK_MODES, f"model.mask_mode={mode!r} is unknown; allowed: {', '.join(MASK_MODES)}")
    k = _get(cfg, "model.num_prototypes")
    check(isinstance(k, int) and k >= 1, f"model.num_prototypes={k} must be an integer >= 1")

    rand_size = _get(cfg, "data.transform.rand_size")
    focal_size = _get(cfg, "data.transform.focal_size")
    focal_views = _get(cfg, "data.transform.focal_views", 0)
    if isinstance(patch, int):
        check(
            isinstance(rand_size, int) and rand_size >= patch,
            f"data.transform.rand_size={rand_size} is smaller than one patch "
            f"(model.encoder.patch_size={patch})",
        )
        if focal_views:
            check(
                isinstance(focal_size, int) and focal_size >= patch,
                f"data.transform.focal_size={focal_size} is smaller than one patch "
                f"(model.encoder.patch_size={patch}); use a larger focal crop or "
                "data.transform.focal_views=0",
            )
    rand_views = _get(cfg, "data.transform.rand_views", 1)
    check(
        isinstance(rand_views, int) and rand_views >= 1,
        f"data.transform.rand_views={rand_views} must be >= 1",
    )

    batch = _get(cfg, "data.batch_size")
    check(isinstance(batch, int) and batch >= 1, f"data.batch_size={batch} must be an integer >= 1")
    if batch == 1 and _get(cfg, "model.head.use_bn", True):
        problems.append(
            "data.batch_size=1 with BatchNorm in the projection head (model.head.use_bn=true): batch "
            "statistics of one sample are undefined; use data.batch_size >= 2 or model.head.use_bn=false"
        )

    name = _get(cfg, "data.name")
    check(name in DATASET_NAMES, f"data.name={name!r} is unknown; allowed: {', '.join(DATASET_NAMES)}")
    if name == "imagefolder":
        root = _get(cfg, "data.root")
        if root in (None, "", "???"):
            problems.append("data.root is required for data=imagefolder (a folder of images)")
        elif not Path(str(root)).expanduser().is_dir():
            problems.append(f"data.root={root!r} does not exist or is not a folder (data=imagefolder)")

    for key in ("ckpt_path", "init_from"):
        path = _get(cfg, key)
        if path not in (None, "") and not (key == "ckpt_path" and path == "last"):
            check(Path(str(path)).expanduser().is_file(), f"{key}={path!r}: no such checkpoint file")

    epochs = _get(cfg, "trainer.max_epochs")
    steps = _get(cfg, "trainer.max_steps", -1)
    check(
        (isinstance(epochs, int) and epochs >= 1) or (isinstance(steps, int) and steps >= 1),
        f"trainer.max_epochs={epochs} / trainer.max_steps={steps}: one of them must be >= 1",
    )
    if _get(cfg, "lowshot.enabled", False):
        shots = _get(cfg, "lowshot.shots") or []
        check(
            len(shots) > 0 and all(isinstance(s, int) and s >= 1 for s in shots),
            f"lowshot.shots={list(shots)} must be a non-empty list of integers >= 1",
        )
        lambd = _get(cfg, "lowshot.lambd")
        lambdas = list(lambd) if isinstance(lambd, ListConfig) else [lambd]
        check(
            len(lambdas) > 0 and all(isinstance(v, (int, float)) and v > 0 for v in lambdas),
            f"lowshot.lambd={lambd} must be a number > 0 or a non-empty list of them",
        )

    if problems:
        raise ConfigError(problems)
