"""Executors: who runs the blocks of a run.

* ``local``: a pool of worker processes, each training whole blocks (:mod:`.local`);
* ``ensemble``: many blocks stacked into one vectorized model per process (:mod:`.ensemble`);
* ``ray``: tasks on an existing or local Ray cluster (optional extra ``psm[ray]``);
* ``slurm``: a SLURM job array through submitit (optional extra ``psm[slurm]``).

Each executor's spec (the ``executor:`` section when it is named, with its options and its
``psm train`` flags) lives beside its code; :data:`EXECUTORS` lists the specs, one line each.
Every task of every executor runs :func:`.task.run_task`.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..runs.config import RunConfig
from ..spec import SpecError
from .base import Executor, ExecutorRegistry, ExecutorSpec
from .ensemble import EnsembleExecutor, EnsembleSpec
from .local import LocalExecutor, LocalSpec
from .ray import RaySpec
from .slurm import SlurmSpec

EXECUTORS = ExecutorRegistry(
    "executor", [LocalSpec, EnsembleSpec, RaySpec, SlurmSpec], default="local"
)

__all__ = [
    "EXECUTORS", "EnsembleExecutor", "Executor", "ExecutorSpec", "LocalExecutor",
    "make_executor",
]  # fmt: skip


def make_executor(name: str, config: RunConfig, **options: Any) -> Executor:
    """Build executor ``name`` for a run of ``config``.

    Its options come from ``config.executor`` (switched to ``name`` if that names another
    executor, :meth:`~.base.ExecutorRegistry.switch`), overridden by ``options``: the values of
    its ``psm train`` flags by dest (``workers``, ``num_cpus``, ``slurm_partition``, ...; None:
    not given). Flags of other executors are ignored.

    Raises:
        ConfigError: an unknown name, or an option or flag that does not validate (one line).
        PSMError: the executor cannot run here (a missing extra, no sbatch).
    """
    spec = config.executor
    if getattr(spec, "name", None) != name:
        try:
            spec = EXECUTORS.validate(EXECUTORS.switch(spec.model_dump(), name))
        except SpecError as e:
            where = f"executor.{e.loc}: " if e.loc and e.loc != "name" else ""
            raise ConfigError(f"{where}{e.message}") from None
    spec = EXECUTORS.validate(spec)
    return spec.with_flags(options).build(config)
