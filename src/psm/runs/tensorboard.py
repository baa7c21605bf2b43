"""Losses and evaluation figures to TensorBoard, when it is installed (``pip install
'psm[tensorboard]'``), and to Weights & Biases when ``train.wandb`` asks for it
(:mod:`psm.runs.wandb_log`); beside, never instead of, the metrics files.

Training writes through a :class:`MetricWriter` (:func:`metric_writer`): TensorBoard gets every
scalar under its tag (``loss/block_0003``); W&B gets the block's scalars in that block's own run,
under the tag's head (``loss``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .run import Run
    from .wandb_log import WandbBlocks

TB_DIR = "tb"
_BLOCK_TAG = re.compile(r"^(?P<name>.+)/block_(?P<block>\d+)$")


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


class MetricWriter:
    """Where a training stack's scalars go: TensorBoard (when installed) and W&B (when
    ``train.wandb`` is set), both optional.

    Args:
        tb: a SummaryWriter or None.
        wandb: the stack's W&B runs or None.
    """

    def __init__(self, tb: Any | None, wandb: WandbBlocks | None = None) -> None:
        self.tb = tb
        self.wandb = wandb

    def add(self, values: dict[str, float], step: int) -> None:
        """Write scalars tagged ``<name>/block_<id>`` (W&B: ``<name>`` in block id's run)."""
        add_scalars(self.tb, values, step)
        if self.wandb is None:
            return
        by_block: dict[int, dict[str, float]] = {}
        for tag, value in values.items():
            m = _BLOCK_TAG.match(tag)
            if m is not None:
                by_block.setdefault(int(m["block"]), {})[m["name"]] = value
        for block, vals in by_block.items():
            self.wandb.log(block, vals, step)

    def close(self) -> None:
        """Finish the W&B runs and close TensorBoard's file."""
        if self.wandb is not None:
            self.wandb.close()
        if self.tb is not None:
            with contextlib.suppress(Exception):
                self.tb.close()


@contextlib.contextmanager
def metric_writer(run: Run, blocks: Sequence[int]) -> Iterator[MetricWriter]:
    """The :class:`MetricWriter` of a stack of ``blocks`` for the ``with`` block.

    Raises:
        PSMError: ``train.wandb`` is set and wandb is missing or cannot start (before anything
            is written).
    """
    wandb = None
    if run.config.train.wandb is not None:
        from .checkpoint import resume_step
        from .wandb_log import WandbBlocks

        wandb = WandbBlocks(run, blocks, {b: resume_step(run, b) for b in blocks})
    writer = MetricWriter(summary_writer(run.path), wandb)
    try:
        yield writer
    finally:
        writer.close()


def add_scalars(writer: Any | None, values: dict[str, float], step: int) -> None:
    """Write scalars to a SummaryWriter or a :class:`MetricWriter`; a writer that fails is
    ignored (TensorBoard never stops a run)."""
    if isinstance(writer, MetricWriter):
        writer.add(values, step)
        return
    if writer is None:
        return
    with contextlib.suppress(Exception):
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
        writer.flush()
