"""``local``: a pool of worker processes on this machine, each training whole blocks."""

from __future__ import annotations

from ..runs.run import Run
from ..training.train import BlockOutcome, train_block
from .base import Executor, cpu_count, longest_first
from .pool import run_pool


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
            outs = []
            for i, b in enumerate(blocks):
                out = train_block(run, b)
                outs.append(out)
                if out.state == "interrupted":
                    outs += [
                        BlockOutcome(c, "interrupted", error="not run") for c in blocks[i + 1 :]
                    ]
                    break
            return outs
        return run_pool(
            run.path, [[b] for b in longest_first(run, blocks)], kind="block", workers=self.workers,
            threads=self.threads,
        )  # fmt: skip
