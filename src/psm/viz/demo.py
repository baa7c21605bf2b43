"""The figures of ``psm demo``."""

from __future__ import annotations

from pathlib import Path

from ..run import Run
from .losses import plot_loss_curves


def demo_figures(runs: list[Run], rows: list, folder: Path, *, progress: bool = True) -> list[Path]:
    """Loss curves of each run (more figures are added by the viz modules)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [plot_loss_curves(r, folder / f"loss_{r.config.name}.png") for r in runs]
