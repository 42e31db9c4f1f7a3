"""Validation of the resolved training config, before anything is built or computed.

Every rule names the key, the bad value and what is allowed, and all problems are reported at
once, so a user fixes a config in one go instead of one crash at a time (possibly hours in).
Besides types, ranges and cross-field rules it checks what the config asks of this machine: the
devices exist and the output folder is writable.
"""

from __future__ import annotations

import logging
import signal
import tempfile
import typing
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.connector import _PRECISION_INPUT
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from msn.backbone import PATCH_SIZES, VIT_SIZES
from msn.data.folders import ON_BAD_IMAGE
from msn.eval.reports import lowshot_json_keys
from msn.masking import MASK_MODES
from msn.training.guards import ON_NONFINITE

log = logging.getLogger(__name__)


def _literal_values(t: Any) -> list[Any]:
    args = typing.get_args(t)
    return [v for a in args for v in (_literal_values(a) if typing.get_args(a) else [a])]


# What Lightning's Trainer accepts as precision.
PRECISIONS: tuple[Any, ...] = tuple(_literal_values(_PRECISION_INPUT))
# Data sets that come with the package (no folder to read).
BUNDLED = ("digits",)

DATASET_NAMES = ("digits", "fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder")


class ConfigError(ValueError):
    """The config is invalid; ``problems`` lists every rule it breaks."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:  # one line for one problem
            super().__init__(f"invalid configuration: {problems[0]}")
        else:
            super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def error_message(err: Exception) -> str:
    """The ``error: ...`` line of a command-line entry for a config problem or a missing value."""
    if isinstance(err, MissingMandatoryValue):
        return f"{err.full_key} is required (give {err.full_key}=...)"
    return str(err)


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range_problems(cfg: DictConfig) -> list[str]:
    """Numbers of the model, data and trainer config outside their ranges."""
    problems = []
    for key in ("model.loss.temperature", "model.loss.sharpen_temperature"):
        value = _get(cfg, key)
        if value is not None and not (_is_number(value) and value > 0):
            problems.append(f"{key}={value} must be a number > 0")
    for key in (
        "model.optim.start_lr",
        "model.optim.ref_lr",
        "model.optim.final_lr",
        "model.optim.clip_grad",
    ):
        value = _get(cfg, key)
        if value is not None and not (_is_number(value) and value >= 0):
            problems.append(f"{key}={value} must be a number >= 0")
    ema = _get(cfg, "model.ema")
    if ema is not None and not (len(ema) == 2 and all(_is_number(m) and 0 <= m <= 1 for m in ema)):
        problems.append(f"model.ema={list(ema)} must be [start, end] momentums in [0, 1]")
    workers = _get(cfg, "data.num_workers")
    if workers is not None and not (_is_int(workers) and workers >= -1):
        problems.append(
            f"data.num_workers={workers} must be an integer >= 0, or -1 for one per CPU core (max 8)"
        )
    every = _get(cfg, "trainer.log_every_n_steps")
    if every is not None and not (_is_int(every) and every >= 1):
        problems.append(f"trainer.log_every_n_steps={every} must be an integer >= 1")
    return problems


def _reliability_problems(cfg: DictConfig) -> list[str]:
    """Bad-image policy, checkpoint interval and the guards of configs/callbacks/default.yaml."""
    problems = []
    policy = _get(cfg, "data.on_bad_image")
    if policy is not None and policy not in ON_BAD_IMAGE:
        problems.append(f"data.on_bad_image={policy!r} is unknown; allowed: {', '.join(ON_BAD_IMAGE)}")
    callbacks = _get(cfg, "callbacks") or {}
    resume = callbacks.get("resume_checkpoint")
    if resume is not None:
        for key, minimum in (("every_n_train_steps", 1), ("keep_last", 0)):
            value = resume.get(key)
            if value is not None and not (_is_int(value) and value >= minimum):
                problems.append(f"callbacks.resume_checkpoint.{key}={value} must be an integer >= {minimum}")
    preemption = callbacks.get("preemption")
    if preemption is not None:
        for name in preemption.get("signals") or []:
            if not (isinstance(name, str) and name in signal.Signals.__members__):
                problems.append(f"callbacks.preemption.signals: {name!r} is not a signal name (e.g. SIGTERM)")
        if resume is None:
            problems.append(
                "callbacks.preemption needs callbacks.resume_checkpoint (the checkpoint it saves on a signal)"
            )
    nonfinite = callbacks.get("nonfinite")
    if nonfinite is not None:
        mode = nonfinite.get("on_nonfinite")
        if mode not in ON_NONFINITE:
            problems.append(
                f"callbacks.nonfinite.on_nonfinite={mode!r} is unknown; allowed: {', '.join(ON_NONFINITE)}"
            )
        skips = nonfinite.get("max_consecutive_skips")
        if skips is not None and not (_is_int(skips) and skips >= 0):
            problems.append(f"callbacks.nonfinite.max_consecutive_skips={skips} must be an integer >= 0")
    collapse = callbacks.get("collapse")
    if collapse is not None:
        fraction = collapse.get("min_fraction")
        if fraction is not None and not (_is_number(fraction) and 0 <= fraction <= 1):
            problems.append(f"callbacks.collapse.min_fraction={fraction} must be a number in [0, 1]")
        patience = collapse.get("patience")
        if patience is not None and not (_is_int(patience) and patience >= 1):
            problems.append(f"callbacks.collapse.patience={patience} must be an integer >= 1")
    return problems


def writable_problem(output_dir: Any, key: str = "output_dir") -> str | None:
    """Why ``output_dir`` (or the nearest folder that exists above it) cannot be written, or None."""
    path = Path(str(output_dir)).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{key}={str(output_dir)!r} is not writable: {str(existing)!r} is a file, not a folder"
    try:  # a real write: permission bits do not tell about read-only mounts, or apply to root
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"{key}={str(output_dir)!r} is not writable ({err.strerror or err})"
    return None


def _environment_problems(cfg: DictConfig) -> list[str]:
    """What the config asks of this machine: the devices and a writable output folder."""
    problems = []
    accelerator = _get(cfg, "trainer.accelerator", "auto")
    devices = _get(cfg, "trainer.devices", "auto")
    if isinstance(devices, ListConfig):
        devices = list(devices)
    if not (
        devices == "auto"
        or (_is_int(devices) and (devices >= 1 or devices == -1))
        or isinstance(devices, list)
    ):
        problems.append(
            f"trainer.devices={devices!r} must be an integer >= 1, -1 (all), a list of indices or auto"
        )
    elif accelerator in ("gpu", "cuda"):
        visible = torch.cuda.device_count()
        wanted = len(devices) if isinstance(devices, list) else devices
        if visible == 0:
            problems.append(
                f"trainer.accelerator={accelerator} but no CUDA GPU is visible on this machine; "
                "use trainer=cpu (or trainer.accelerator=cpu)"
            )
        elif _is_int(wanted) and wanted > visible:
            problems.append(
                f"trainer.devices={devices} but only {visible} GPU(s) are visible on this machine"
            )
        elif isinstance(devices, list) and any(not _is_int(d) or not 0 <= d < visible for d in devices):
            problems.append(f"trainer.devices={devices}: the visible GPUs are 0..{visible - 1}")
    elif accelerator == "mps" and not torch.backends.mps.is_available():
        problems.append("trainer.accelerator=mps but MPS is not available on this machine")
    nodes = _get(cfg, "trainer.num_nodes", 1)
    if not (_is_int(nodes) and nodes >= 1):
        problems.append(f"trainer.num_nodes={nodes} must be an integer >= 1")
    output_dir = _get(cfg, "output_dir")
    if output_dir not in (None, ""):
        problem = writable_problem(output_dir)
        if problem:
            problems.append(problem)
    return problems


def validate_config(cfg: DictConfig, environment: bool = True) -> None:
    """Raise :class:`ConfigError` listing every problem of a resolved train config.

    Args:
        cfg: the composed config of ``train.py``.
        environment: also check this machine (devices, output folder); off to validate a config
            meant for another machine (e.g. a GPU cluster's from a laptop).
    """
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
            patch not in PATCH_SIZES
            or not isinstance(rand_size, int)
            or rand_size < patch
            or rand_size % patch == 0,
            f"data.transform.rand_size={rand_size} is not a multiple of model.encoder.patch_size={patch}: "
            f"the last {rand_size % patch if isinstance(rand_size, int) else 0} pixel rows and columns would "
            "be dropped",
        )
        if focal_views and isinstance(focal_size, int) and focal_size >= patch and focal_size % patch:
            # The official ViT-L/7 recipe crops 96 px focal views for patch 7: a warning, not an error.
            log.warning(
                "data.transform.focal_size=%d is not a multiple of model.encoder.patch_size=%d: the last "
                "%d pixel rows and columns of each focal view are dropped",
                focal_size,
                patch,
                focal_size % patch,
            )
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
    root = _get(cfg, "data.root")
    check(
        name not in BUNDLED or root in (None, ""),
        f"data.root={root!r} is given, but data={name} is bundled and reads no folder; for your own "
        "images use data=imagefolder data.root=...",
    )
    if name == "imagefolder":
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
        _is_int(steps) and (steps == -1 or steps >= 1),
        f"trainer.max_steps={steps!r} must be -1 (no step limit) or an integer >= 1",
    )
    precision = _get(cfg, "trainer.precision", "32-true")
    allowed = ", ".join(dict.fromkeys(map(str, PRECISIONS)))
    check(precision in PRECISIONS, f"trainer.precision={precision!r} is unknown; allowed: {allowed}")
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

    metric = cfg.get("optimized_metric")
    if metric is not None:
        columns = lowshot_json_keys(
            _get(cfg, "lowshot.shots") or [],
            _get(cfg, "lowshot.percents") or [],
            _get(cfg, "lowshot.subset_files") or [],
        )
        if not _get(cfg, "lowshot.enabled", False):
            problems.append(
                f"optimized_metric={str(metric)!r} needs lowshot.enabled=true (it is read from that table)"
            )
        elif str(metric) not in columns:
            problems.append(
                f"optimized_metric={str(metric)!r} is not a low-shot column; allowed: {', '.join(columns)}"
            )

    problems += _range_problems(cfg)
    problems += _reliability_problems(cfg)
    if environment:
        problems += _environment_problems(cfg)
    if problems:
        raise ConfigError(problems)
