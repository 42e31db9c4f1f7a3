"""``msn-prepare``: an image folder as LitData's optimized chunks, for ``data=litdata``.

msn-prepare src=/path/to/images out=/path/to/chunks
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from msn.checks import ConfigError, int_problems
from msn.cli.common import hydra_entry


def prepare(cfg: DictConfig) -> dict[str, int]:
    """Run ``msn-prepare`` for a composed ``configs/prepare.yaml``; returns the records per split."""
    problems = [] if cfg.num_workers is None else int_problems("num_workers", cfg.num_workers, 1)
    if problems:
        raise ConfigError(problems)
    try:
        from msn.data.streaming import prepare_litdata
    except ImportError as err:
        raise ConfigError([f"msn-prepare needs litdata ({err}): pip install 'msn-lightning[data]'"]) from err
    written = prepare_litdata(cfg.src, cfg.out, cfg.num_workers, str(cfg.chunk_bytes), cfg.list_cache)
    for split, count in written.items():
        print(f"{split}: {count} images in {cfg.out}/{split}", flush=True)
    print(f"train with: python train.py data=litdata data.root={cfg.out}", flush=True)
    return written


def main() -> Any:
    """Console-script entry (``msn-prepare``)."""
    return hydra_entry("prepare", prepare)()


if __name__ == "__main__":
    main()
