"""What every command-line entry shares: where the configs are, how bad input ends, which device."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from msn.checks import ConfigError, error_message
from msn.cli.console import quiet_lightning


def _config_dirs() -> tuple[Path, Path]:
    """Where the configs can be: inside the package (a wheel, built from the checkout's
    ``configs/`` as ``msn/configs``), and next to it (a source tree or an editable install)."""
    package = Path(__file__).resolve().parents[1]
    return package / "configs", package.parent / "configs"


def config_dir() -> Path:
    """The Hydra configs: the copy installed inside the package, else the checkout's ``configs/``."""
    installed, checkout = _config_dirs()
    return installed if installed.is_dir() else checkout


CONFIG_DIR = config_dir()
#: A config that cannot run: one ``error: ...`` line and exit status 2, before any compute.
BAD_CONFIG: tuple[type[BaseException], ...] = (ConfigError, MissingMandatoryValue)
#: ... and, for the commands that read a checkpoint or files first, those that cannot be read.
BAD_INPUT: tuple[type[BaseException], ...] = (*BAD_CONFIG, FileNotFoundError, ValueError)


def hydra_entry(
    config_name: str,
    run: Callable[[DictConfig], Any],
    bad_input: tuple[type[BaseException], ...] = BAD_INPUT,
    stopped: tuple[type[BaseException], ...] = (),
) -> Callable[[], Any]:
    """A command-line main: compose ``configs/<config_name>.yaml`` with the command-line overrides
    and return ``run(cfg)`` (what a Hydra sweeper optimises). ``bad_input`` errors end with one
    ``error: ...`` line and exit status 2, ``stopped`` ones (a guard stopped the run) with exit
    status 1; anything else is a bug and keeps its traceback."""

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
    def _main(cfg: DictConfig) -> Any:
        quiet_lightning()
        try:
            return run(cfg)
        except bad_input as err:
            print(f"error: {error_message(err)}", file=sys.stderr)
            sys.exit(2)
        except stopped as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    if not CONFIG_DIR.is_dir():
        installed, checkout = _config_dirs()
        sys.exit(
            f"error: no config folder: neither {installed} (installed package) nor {checkout} "
            "(source checkout) exists; reinstall the package (pip install .)"
        )
    return _main


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (cuda when available) as a device; ConfigError for cuda
    without one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["device=cuda but no CUDA device is available; use device=cpu or device=auto"])
    return torch.device(name)
