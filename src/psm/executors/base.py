"""The executor interface: who runs the blocks of a run.

Every executor ends up calling :func:`psm.training.train.train_block` (or the ensemble trainer,
which
writes the same files), so executors are interchangeable and a block started by one can be
resumed by another.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

from ..runs.run import Run
from ..training.train import BlockOutcome


def cpu_count() -> int:
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def balanced_shares(blocks: list[int], loads: list[int], n: int) -> list[list[int]]:
    """Split ``blocks`` into at most ``n`` shares of nearly equal total load (greedy: the
    largest load first, each to the lightest share; each share in block order).

    With equal loads this is the interleaved split ``blocks[i::n]``. Empty shares are dropped.

    Args:
        blocks: block ids.
        loads: the work of each block (its step target), same order as ``blocks``.
        n: most shares (workers).
    """
    shares: list[list[int]] = [[] for _ in range(max(1, n))]
    totals = [0] * len(shares)
    for pos in sorted(range(len(blocks)), key=lambda k: (-loads[k], k)):
        i = min(range(len(shares)), key=lambda j: (totals[j], j))
        shares[i].append(pos)
        totals[i] += loads[pos]
    return [[blocks[k] for k in sorted(s)] for s in shares if s]


def longest_first(run: Run, blocks: list[int]) -> list[int]:
    """``blocks`` with the largest step targets first (a queue of whole blocks then ends with
    the short ones, so workers finish together); ties keep their order."""
    return sorted(blocks, key=lambda b: -run.step_target(b))


class Executor(ABC):
    """Trains a list of blocks of a run and reports one outcome per block."""

    name: str = ""

    @abstractmethod
    def run(self, run: Run, blocks: list[int]) -> list[BlockOutcome]:
        """Train ``blocks`` (ids of ``run``) to the run's step target."""

    def describe(self) -> str:
        """One line for the block plan."""
        return self.name
