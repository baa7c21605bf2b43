"""The block ledger: each block's status record, its step target, and whether it is done.

A block's status lives in ``blocks/NNNN.json`` (:class:`~psm.runs.layout.RunLayout`), written
atomically by the worker that holds the block's lock. **Done** has one meaning: the block's
status says ``done``, its weights are on disk, and it reached a step target (or spent its time
budget). Which target is the caller's choice:

* the block's **own** target, recorded when it was trained (``target=None``): what inference
  asks, since blocks may be trained to different step counts;
* **this invocation's** target (:meth:`BlockLedger.invocation_target`: ``train.block_steps[b]``
  or ``train.steps``): what a training call asks.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from ..core.partition import Partition
from ..errors import RunError
from .atomic import atomic_write_json
from .config import RunConfig
from .layout import RunLayout


@dataclass
class BlockStatus:
    """What ``psm status`` shows for one block."""

    block: int
    span: str
    state: str  # pending | running | stopped | done | failed
    step: int
    target: int
    last_loss: float | None
    wall_time: float
    checkpoint_step: int | None
    checkpoint_time: float | None
    error: str | None
    updated: float | None
    host: str | None = None
    job: str | None = None
    init_from: dict[str, Any] | None = None  # a warm start: {run, hash, block} it started from
    # a done block whose resume point was deleted (psm prune, train.keep_state: false): more
    # steps later restart its optimizer from its final weights
    pruned: bool = False


class BlockLedger:
    """The status records of a run's blocks.

    Args:
        layout: where the run's files are.
        partition: the run's blocks (their number and spans).
        config: the run's config (this invocation's step targets and time budget).
    """

    def __init__(self, layout: RunLayout, partition: Partition, config: RunConfig) -> None:
        self.layout = layout
        self.partition = partition
        self.config = config

    @property
    def num_blocks(self) -> int:
        return self.partition.num_blocks

    def _ids(self, blocks: list[int] | None) -> list[int]:
        return list(range(self.num_blocks)) if blocks is None else list(blocks)

    # ------------------------------------------------------------------ records
    def read(self, block: int) -> dict[str, Any] | None:
        """The raw status record of a block, or None before it first started (or unreadable)."""
        try:
            return json.loads(self.layout.status(block).read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def write(self, block: int, **fields: Any) -> None:
        """Merge ``fields`` into a block's status record (atomic)."""
        rec = self.read(block) or {}
        rec.update(fields)
        rec.update(block=block, updated=time.time(), host=socket.gethostname(), pid=os.getpid())
        # a progress record: atomic, not fsynced (the checkpoint is the durable truth)
        atomic_write_json(self.layout.status(block), rec, durable=False)

    # ------------------------------------------------------------------ targets and done
    def invocation_target(self, block: int) -> int:
        """The step target this invocation gives a block (``train.block_steps[block]`` or
        ``train.steps``): a block trained now goes to it and records it in its status."""
        return self.config.step_target(block)

    def done(self, block: int, target: int | None = None) -> bool:
        """Whether a block is done: status ``done``, weights on disk, and ``target`` steps
        reached or its time budget spent.

        Args:
            block: the block id.
            target: the step target to check; None: the block's own recorded target.
        """
        rec = self.read(block)
        if not rec or rec.get("state") != "done" or not self.layout.weights(block).exists():
            return False
        if target is None:
            own = int(rec.get("target", self.invocation_target(block)))
            return rec.get("step", 0) >= own or bool(rec.get("budget_spent"))
        budget = self.config.train.max_seconds
        spent = budget is not None and float(rec.get("wall_time", 0.0)) >= budget
        return rec.get("step", 0) >= target or spent

    def not_done(self, blocks: list[int] | None = None, *, invocation: bool = False) -> list[int]:
        """The blocks (of ``blocks``, default all) that are not :meth:`done`.

        Args:
            blocks: block ids (default: all).
            invocation: judge each block at this invocation's target (what a training call
                has left to do); False: at its own recorded target (what inference needs).
        """
        return [
            b
            for b in self._ids(blocks)
            if not self.done(b, self.invocation_target(b) if invocation else None)
        ]

    # ------------------------------------------------------------------ views
    def status(self, block: int) -> BlockStatus:
        """The status of one block, with ``running`` checked against its lock."""
        from .lock import lock_holder_alive

        rec = self.read(block) or {}
        state = rec.get("state", "pending")
        if state == "done" and not self.done(block):
            state = "stopped"  # weights missing
        if state == "running" and not lock_holder_alive(self.layout.lock(block)):
            state = "stopped"
        return BlockStatus(
            block=block,
            span=self.partition.describe(block),
            state=state,
            step=int(rec.get("step", 0)),
            target=int(rec.get("target", self.invocation_target(block))),
            last_loss=rec.get("last_loss"),
            wall_time=float(rec.get("wall_time", 0.0)),
            checkpoint_step=rec.get("checkpoint_step"),
            checkpoint_time=rec.get("checkpoint_time"),
            error=rec.get("error"),
            updated=rec.get("updated"),
            host=rec.get("host"),
            job=rec.get("job"),
            init_from=rec.get("init_from"),
            pruned=bool(rec.get("pruned")) and not self.layout.state(block).exists(),
        )

    def statuses(self, blocks: list[int] | None = None) -> list[BlockStatus]:
        """Status of the given blocks (default: all)."""
        return [self.status(b) for b in self._ids(blocks)]

    def trained(self) -> list[int]:
        """Blocks holding training worth keeping: any state but ``failed``, and ``pending``
        only with a checkpoint or weights on disk."""
        out = []
        for b in range(self.num_blocks):
            state = (self.read(b) or {}).get("state", "pending")
            has_files = self.layout.state(b).exists() or self.layout.weights(b).exists()
            if state != "failed" and (state != "pending" or has_files):
                out.append(b)
        return out

    def failed(self) -> list[int]:
        """Blocks whose last training failed (e.g. a non-finite loss)."""
        return [b for b in range(self.num_blocks) if (self.read(b) or {}).get("state") == "failed"]

    def reset(self, blocks: list[int]) -> None:
        """Discard blocks' checkpoints, weights, status and metrics (they start over)."""
        for b in blocks:
            for p in self.layout.block_files(b):
                try:
                    p.unlink(missing_ok=True)
                except OSError as e:
                    raise RunError(f"cannot remove {p}: {e.strerror}") from None
