"""The one task body every executor runs, and the cluster task around it.

A *task* is a list of blocks that one worker trains: one block (``local``'s pool, a SLURM
array task), a stack of blocks (``ensemble``'s shares, a grouped Ray task) or every block
(``local``/``ensemble`` in this process). :func:`run_task` trains a task of an opened run the
same way wherever it runs, so outcomes and error strings do not depend on the executor;
:func:`train_task` is what a Ray task or a SLURM array task calls: it opens the run from its
path, sets the torch threads, runs :func:`run_task`, then waits for blocks locked on another
host.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

from ..errors import PSMError
from ..runs.lock import held_elsewhere, lock_holder_alive
from ..runs.run import Run
from ..training.train import BlockOutcome


def run_task(
    run: Run,
    blocks: Sequence[int],
    *,
    stacked: bool = False,
    max_stack: int | None = None,
    errors: Literal["fail", "raise"] = "fail",
) -> list[BlockOutcome]:
    """Train ``blocks`` of an opened run: the body of every executor's task.

    Args:
        run: the run.
        blocks: the blocks of this task.
        stacked: train them as stacks with :func:`~psm.training.train.train_ensemble`;
            otherwise one after another with :func:`~psm.training.train.train_block`, stopping
            after the first ``interrupted`` one (the rest are ``interrupted``, "not run").
        max_stack: most blocks per stack (``stacked`` only).
        errors: what a :class:`~psm.errors.PSMError` (bad checkpoint, disk full: a retry
            would not fix it) becomes: ``fail``, ``failed`` outcomes (of the block, or of the
            whole stack); ``raise``, the error itself, for a task run in the psm process, which
            reports it as its one-line error.

    Returns:
        One outcome per block, in the order of ``blocks`` (``stacked``: block order). Any
        exception other than a PSMError propagates (a Ray task is retried, a pool worker
        reports it).
    """
    from ..training.train import train_block, train_ensemble

    ids = list(blocks)
    if stacked:
        try:
            return train_ensemble(run, ids, max_stack=max_stack)
        except PSMError as e:
            if errors == "raise":
                raise
            return [BlockOutcome(b, "failed", error=str(e)) for b in ids]
    outs: list[BlockOutcome] = []
    for i, b in enumerate(ids):
        try:
            outs.append(train_block(run, b))
        except PSMError as e:
            if errors == "raise":
                raise
            outs.append(BlockOutcome(b, "failed", error=str(e)))
        if outs[-1].state == "interrupted":
            outs += [BlockOutcome(c, "interrupted", error="not run") for c in ids[i + 1 :]]
            break
    return outs


def train_task(
    run_path: str,
    blocks: list[int],
    *,
    stacked: bool = False,
    max_stack: int | None = None,
    threads: int | None = None,
    lock_wait_s: float = 0.0,
    poll_s: float = 5.0,
) -> list[BlockOutcome]:
    """Train ``blocks`` of a run inside one cluster task (a Ray task or a SLURM array task).

    Args:
        run_path: the run directory (absolute, on a disk the task's machine sees).
        blocks: the blocks of this task.
        stacked, max_stack: see :func:`run_task`.
        threads: torch threads (None: leave torch's default).
        lock_wait_s: how long to wait for a block locked by a holder on ANOTHER machine: a
            holder killed with its machine (or whose retry landed elsewhere) keeps a fresh
            heartbeat for up to two minutes, after which its lock is taken over.
        poll_s: seconds between looks at such a lock.

    Returns:
        One outcome per block, as :func:`run_task` gives them; any exception other than a
        :class:`~psm.errors.PSMError` propagates, so the engine retries the task.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    run = Run.open(run_path)
    outs = {o.block: o for o in run_task(run, blocks, stacked=stacked, max_stack=max_stack)}
    deadline = time.monotonic() + lock_wait_s

    def worth_waiting(b: int) -> bool:
        path = run.layout.lock(b)
        return held_elsewhere(path) or not lock_holder_alive(path)

    while time.monotonic() < deadline:
        waiting = [b for b, o in outs.items() if o.state == "locked" and worth_waiting(b)]
        if not waiting:
            break
        free = [b for b in waiting if not lock_holder_alive(run.layout.lock(b))]
        if free:
            outs.update(
                {o.block: o for o in run_task(run, free, stacked=stacked, max_stack=max_stack)}
            )
        else:
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    return [outs[b] for b in blocks]
