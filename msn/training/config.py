"""Validation of the resolved training config, before anything is built or computed.

Every rule names the key, the bad value and what is allowed, and all problems are reported at
once, so a user fixes a config in one go instead of one crash at a time (possibly hours in).
The rules of single values live with the objects that take them: the class a node's
``_target_`` names (the model, the data module, each callback) lists what is wrong with its
arguments in its ``problems`` function, looked up here without building anything. This module
keeps the rules that relate nodes to each other, Lightning's trainer values and what the config
asks of this machine: the devices exist, the output folder is writable, the files are there.
"""

from __future__ import annotations

import logging
import tempfile
import typing
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from lightning.fabric.connector import _PRECISION_INPUT
from omegaconf import DictConfig, ListConfig, OmegaConf

from msn.backbone import PATCH_SIZES
from msn.checks import ConfigError, is_int
from msn.eval.reports import evaluation_problems, lowshot_json_keys
from msn.training.precision import AUTO

log = logging.getLogger(__name__)


def _literal_values(t: Any) -> list[Any]:
    args = typing.get_args(t)
    return [v for a in args for v in (_literal_values(a) if typing.get_args(a) else [a])]


# What trainer.precision accepts: Lightning's values, and auto (resolved by msn.training.precision
# before the Trainer is built).
PRECISIONS: tuple[Any, ...] = (*_literal_values(_PRECISION_INPUT), AUTO)
# Data sets that come with the package (no folder to read).
BUNDLED = ("digits",)
# The data sets that read the user's own data.root, and what it must be.
ROOTED = {
    "imagefolder": "a folder of images",
    "hf": "a Hugging Face dataset folder",
    "litdata": "a folder written by msn-prepare, or its URL",
}


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def _owner_problems(cfg: DictConfig, key: str) -> list[str]:
    """What the class that node ``key`` builds finds wrong with its arguments, named by full keys.

    The class is the node's ``_target_`` when it is one of this package's and has a ``problems``
    function (the model, the data module, the callbacks); it is looked up, not instantiated.
    """
    node = _get(cfg, key)
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not (isinstance(target, str) and target.startswith("msn.")):
        return []
    try:
        owner = get_object(target)
    except (ImportError, AttributeError, ValueError) as err:
        return [f"{key}._target_={target!r} cannot be imported: {err}"]
    check = getattr(owner, "problems", None)
    if check is None:
        return []
    arguments = OmegaConf.to_container(node, resolve=True)
    kwargs = {str(k): v for k, v in arguments.items() if not str(k).startswith("_")}  # type: ignore[union-attr]
    try:
        return [f"{key}.{p}" for p in check(**kwargs)]
    except TypeError as err:  # a key the constructor does not take
        return [f"{key}: {err}"]


def _trainer_problems(cfg: DictConfig) -> list[str]:
    """Values of Lightning's Trainer, which has no problems function of its own."""
    every = _get(cfg, "trainer.log_every_n_steps")
    if every is not None and not (is_int(every) and every >= 1):
        return [f"trainer.log_every_n_steps={every} must be an integer >= 1"]
    return []


def _callback_problems(cfg: DictConfig) -> list[str]:
    """Each callback's own problems, and the resume checkpoint that preemption saves to."""
    callbacks = _get(cfg, "callbacks") or {}
    problems = [p for name in callbacks for p in _owner_problems(cfg, f"callbacks.{name}")]
    if callbacks.get("preemption") is not None and callbacks.get("resume_checkpoint") is None:
        problems.append(
            "callbacks.preemption needs callbacks.resume_checkpoint (the checkpoint it saves on a signal)"
        )
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
        or (is_int(devices) and (devices >= 1 or devices == -1))
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
        elif is_int(wanted) and wanted > visible:
            problems.append(
                f"trainer.devices={devices} but only {visible} GPU(s) are visible on this machine"
            )
        elif isinstance(devices, list) and any(not is_int(d) or not 0 <= d < visible for d in devices):
            problems.append(f"trainer.devices={devices}: the visible GPUs are 0..{visible - 1}")
    elif accelerator == "mps" and not torch.backends.mps.is_available():
        problems.append("trainer.accelerator=mps but MPS is not available on this machine")
    nodes = _get(cfg, "trainer.num_nodes", 1)
    if not (is_int(nodes) and nodes >= 1):
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

    problems += _owner_problems(cfg, "model") + _owner_problems(cfg, "data")

    # Crops and patches: the data module's crops must cut into the model's patches.
    patch = _get(cfg, "model.encoder.patch_size")
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
    batch = _get(cfg, "data.batch_size")
    if batch == 1 and _get(cfg, "model.head.use_bn", True):
        problems.append(
            "data.batch_size=1 with BatchNorm in the projection head (model.head.use_bn=true): batch "
            "statistics of one sample are undefined; use data.batch_size >= 2 or model.head.use_bn=false"
        )

    name = _get(cfg, "data.name")
    root = _get(cfg, "data.root")

    check(
        name not in BUNDLED or root in (None, ""),
        f"data.root={root!r} is given, but data={name} is bundled and reads no folder; for your own "
        "images use data=imagefolder data.root=...",
    )
    if name in ROOTED:
        if root in (None, "", "???"):
            problems.append(f"data.root is required for data={name} ({ROOTED[name]})")
        elif not (name == "litdata" and "://" in str(root)) and not Path(str(root)).expanduser().is_dir():
            # A LitData root may be an object-store URL: LitData reads it.
            problems.append(f"data.root={root!r} does not exist or is not a folder (data={name})")

    for key in ("ckpt_path", "init_from"):
        path = _get(cfg, key)
        if path not in (None, "") and not (key == "ckpt_path" and path == "last"):
            check(Path(str(path)).expanduser().is_file(), f"{key}={path!r}: no such checkpoint file")

    epochs = _get(cfg, "trainer.max_epochs")
    steps = _get(cfg, "trainer.max_steps", -1)
    check(
        is_int(steps) and (steps == -1 or steps >= 1),
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
        # The rules of the lowshot.* values live with the evaluation they build.
        problems += evaluation_problems("lowshot", cfg.lowshot)
    if _get(cfg, "report.enabled", False):
        problems += evaluation_problems("report", cfg.report)

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

    problems += _trainer_problems(cfg)
    problems += _callback_problems(cfg)
    if environment:
        problems += _environment_problems(cfg)
    if problems:
        raise ConfigError(problems)
