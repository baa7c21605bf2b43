"""``ensemble``: blocks stacked into one vectorized model per process (see psm.ensemble)."""

from __future__ import annotations

from ..runs.run import Run
from ..training.train import BlockOutcome, train_ensemble
from .base import Executor, balanced_shares, cpu_count
from .pool import run_pool


class EnsembleExecutor(Executor):
    """Train blocks stacked with torch.func; ``workers > 1`` splits them over processes.

    Args:
        workers: processes, each training an interleaved share of the blocks as one stack.
        max_stack: most blocks stacked at once (memory bound).
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
            return train_ensemble(run, blocks, max_stack=self.max_stack)
        # equal targets: the interleaved split; train.block_steps: shares of equal work
        loads = [run.step_target(b) for b in blocks]
        shares = balanced_shares(blocks, loads, self.workers)
        return run_pool(
            run.path, shares, kind="ensemble", workers=len(shares), threads=self.threads,
            max_stack=self.max_stack,
        )  # fmt: skip
