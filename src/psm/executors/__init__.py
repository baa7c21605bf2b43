"""Executors: who runs the blocks of a run.

* ``local``: a pool of worker processes, each training whole blocks (:mod:`.local`);
* ``ensemble``: many blocks stacked into one vectorized model per process (:mod:`.ensemble`);
* ``ray``: tasks on an existing or local Ray cluster (optional extra ``psm[ray]``);
* ``slurm``: a SLURM job array through submitit (optional extra ``psm[slurm]``).
"""

from __future__ import annotations

from typing import Any

from ..runs.config import EXECUTOR_NAMES, RunConfig
from .base import Executor
from .ensemble import EnsembleExecutor
from .local import LocalExecutor

__all__ = ["EXECUTOR_NAMES", "EnsembleExecutor", "Executor", "LocalExecutor", "make_executor"]


def make_executor(name: str, config: RunConfig, **options: Any) -> Executor:
    """Build an executor by name; ``options`` (e.g. workers) override the config's."""
    ex = config.executor
    workers = options.get("workers") or ex.workers
    threads = config.train.threads
    if name == "local":
        return LocalExecutor(workers=workers, threads=threads)
    if name == "ensemble":
        return EnsembleExecutor(
            workers=workers, max_stack=options.get("max_stack") or ex.ensemble_size,
            threads=threads,
        )  # fmt: skip
    if name == "ray":
        from .ray import RayExecutor

        return RayExecutor.from_config(config, **options)
    if name == "slurm":
        from .slurm import SlurmExecutor

        return SlurmExecutor.from_config(config, **options)
    raise ValueError(f"unknown executor {name!r} (choose from {', '.join(EXECUTOR_NAMES)})")
