"""Losses and evaluation figures to TensorBoard, when it is installed (``pip install
'psm[tensorboard]'``); beside, never instead of, the metrics files."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

TB_DIR = "tb"


def summary_writer(run_path: str | Path) -> Any | None:
    """A :class:`torch.utils.tensorboard.SummaryWriter` on ``<run>/tb``, or None when
    TensorBoard is not installed (or the folder cannot be written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    try:
        return SummaryWriter(log_dir=str(Path(run_path) / TB_DIR))
    except OSError:
        return None


def add_scalars(writer: Any | None, values: dict[str, float], step: int) -> None:
    """Write scalars; a writer that fails is ignored (TensorBoard never stops a run)."""
    if writer is None:
        return
    with contextlib.suppress(Exception):
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
        writer.flush()
