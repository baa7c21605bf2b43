"""``local``: a pool of worker processes on this machine, each training whole blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..runs.run import Run
from ..training.train import BlockOutcome
from .base import Executor, ExecutorSpec, cpu_count, longest_first
from .flags import WORKERS
from .pool import run_pool
from .task import run_task

if TYPE_CHECKING:
    from ..runs.config import RunConfig


class LocalExecutor(Executor):
    """Train blocks one per task on ``workers`` processes (``workers=1``: in this process).

    Args:
        workers: worker processes.
        threads: torch threads per worker (default: CPUs / workers).
    """

    name = "local"

    def __init__(self, workers: int = 1, threads: int | None = None) -> None:
        self.workers = workers
        self.threads = threads or max(1, cpu_count() // workers)

    def describe(self) -> str:
        return f"local: {self.workers} worker(s) x {self.threads} thread(s)"

    def run(self, run: Run, blocks: list[int]) -> list[BlockOutcome]:
        if self.workers == 1:
            import torch

            torch.set_num_threads(self.threads)
            return run_task(run, blocks, errors="raise")  # psm train reports a PSMError
        return run_pool(
            run.path, [[b] for b in longest_first(run, blocks)], kind="block", workers=self.workers,
            threads=self.threads,
        )  # fmt: skip


class LocalSpec(ExecutorSpec):
    """``executor: {name: local}``: whole blocks on a pool of processes (the default)."""

    name: Literal["local"] = "local"
    workers: int = Field(1, ge=1)  # processes (1: in the psm process itself)

    flags = (WORKERS,)

    def build(self, config: RunConfig) -> LocalExecutor:
        return LocalExecutor(workers=self.workers, threads=config.train.threads)
