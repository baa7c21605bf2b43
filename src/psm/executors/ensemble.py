"""``ensemble``: blocks stacked into one vectorized model per process (see psm.ensemble)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..runs.checkpoint import resume_step
from ..runs.run import Run
from ..training.train import BlockOutcome
from .base import Executor, ExecutorSpec, balanced_shares, cpu_count
from .flags import MAX_STACK, WORKERS
from .pool import run_pool
from .task import run_task

if TYPE_CHECKING:
    from ..runs.config import RunConfig


class EnsembleExecutor(Executor):
    """Train blocks stacked with torch.func; ``workers > 1`` splits them over processes.

    Args:
        workers: processes, each training an interleaved share of the blocks as one stack.
        max_stack: most blocks stacked at once (None: 16 on a CPU, all on a GPU).
        threads: torch threads per process (default: CPUs / workers).
    """

    name = "ensemble"

    def __init__(
        self, workers: int = 1, max_stack: int | None = None, threads: int | None = None
    ) -> None:
        self.workers = workers
        self.max_stack = max_stack
        self.threads = threads or max(1, cpu_count() // workers)

    def describe(self) -> str:
        stack = f", at most {self.max_stack} per stack" if self.max_stack else ""
        return f"ensemble: {self.workers} process(es) x {self.threads} thread(s){stack}"

    def run(self, run: Run, blocks: list[int]) -> list[BlockOutcome]:
        if self.workers == 1:
            import torch

            torch.set_num_threads(self.threads)
            return run_task(run, blocks, stacked=True, max_stack=self.max_stack, errors="raise")
        # equal targets: the interleaved split; train.block_steps or blocks resumed at other
        # steps (a budget plan's rounds): shares of equal remaining work
        loads = [max(0, run.config.step_target(b) - resume_step(run, b)) for b in blocks]
        shares = balanced_shares(blocks, loads, self.workers)
        return run_pool(
            run.path, shares, kind="ensemble", workers=len(shares), threads=self.threads,
            max_stack=self.max_stack,
        )  # fmt: skip


class EnsembleSpec(ExecutorSpec):
    """``executor: {name: ensemble}``: blocks stacked into one vectorized model per process."""

    name: Literal["ensemble"] = "ensemble"
    workers: int = Field(1, ge=1)  # processes, each training a share of the blocks as stacks
    ensemble_size: int | None = Field(None, ge=1)  # most blocks stacked at once (memory bound)

    flags = (WORKERS, MAX_STACK)

    def build(self, config: RunConfig) -> EnsembleExecutor:
        return EnsembleExecutor(
            workers=self.workers, max_stack=self.ensemble_size, threads=config.train.threads
        )
