"""The executor interface: who runs the blocks of a run.

Every executor ends up calling :func:`psm.train.train_block` (or the ensemble trainer, which
writes the same files), so executors are interchangeable and a block started by one can be
resumed by another.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

from ..run import Run
from ..train import BlockOutcome


def cpu_count() -> int:
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class Executor(ABC):
    """Trains a list of blocks of a run and reports one outcome per block."""

    name: str = ""

    @abstractmethod
    def run(self, run: Run, blocks: list[int]) -> list[BlockOutcome]:
        """Train ``blocks`` (ids of ``run``) to the run's step target."""

    def describe(self) -> str:
        """One line for the block plan."""
        return self.name
