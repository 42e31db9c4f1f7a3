"""What every figure of the report shares: pyplot without a display, and saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only: works on machines without a display);
    imported on first use, since importing matplotlib is slow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, tight: bool = True) -> Path:
    """Lay out (unless the caller did), write ``path`` and free the figure."""
    if tight:
        fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path
