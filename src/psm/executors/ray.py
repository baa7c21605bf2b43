"""``ray``: one Ray task per block (or per group of blocks, trained stacked) on a Ray cluster.

The executor connects to an existing cluster (``--address auto`` or ``host:port``) or starts a
local Ray instance (``--local-cpus`` CPUs) and shuts it down afterwards. Every task calls
:func:`psm.executors.task.train_task`, as the SLURM array tasks do:

* a task asks Ray for ``num_cpus`` / ``num_gpus`` and uses that many torch threads;
* a task whose worker dies (killed, out of memory, node lost) or that raises is retried up to
  ``max_retries`` times; the retry resumes the block from its last checkpoint, because
  :func:`~psm.training.train.train_block` is resumable and takes over the dead worker's lock;
* errors a retry cannot fix (a :class:`~psm.errors.PSMError`: bad checkpoint, disk full) come
  back as ``failed`` outcomes and are not retried;
* progress reaches the driver through the block status files, so the run directory must be on
  a disk every node sees (the usual shared file system of a cluster).

Ray is an optional extra: ``pip install 'psm[ray]'``; it is imported only when used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..errors import PSMError
from ..runs.run import Run
from ..training.train import BlockOutcome, note_failure
from .base import Executor, ExecutorSpec
from .flags import MAX_STACK, WORKERS, Flag
from .task import train_task

if TYPE_CHECKING:
    from typing import Self

    from ..runs.config import RunConfig

INSTALL_HINT = "pip install 'psm[ray]'"


def import_ray() -> Any:
    """The ``ray`` module, or a one-line :class:`~psm.errors.PSMError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PSMError(f"the ray executor needs Ray: {INSTALL_HINT}") from None
    return ray


# --------------------------------------------------------------------------- the executor
class RayExecutor(Executor):
    """Train blocks as Ray tasks.

    Args:
        address: cluster address (``auto``, ``host:port``, ``ray://host:port``); None starts a
            local Ray instance for this call and stops it afterwards. A Ray already initialised
            in this process is used as it is.
        local_cpus: CPUs of that local instance (None: all of this machine's).
        num_cpus: CPUs per task; a task uses ``floor(num_cpus)`` torch threads (at least 1).
        num_gpus: GPUs per task (fractions share a GPU); set ``train.device`` to auto or cuda.
        max_retries: retries of a task whose worker died or that raised.
        group_size: blocks per task, trained stacked (None: one block per task).
        max_stack: most blocks per stack inside a grouped task.
        lock_wait_s: see :func:`~psm.executors.task.train_task`.
        threads: torch threads per task (default from ``num_cpus``).
        runtime_env: Ray runtime environment of the job (env vars, pip packages, setup hook).
    """

    name = "ray"

    def __init__(
        self,
        *,
        address: str | None = None,
        local_cpus: int | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        max_retries: int = 3,
        group_size: int | None = None,
        max_stack: int | None = None,
        lock_wait_s: float = 150.0,
        threads: int | None = None,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:
        self.address = address
        self.local_cpus = local_cpus
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_retries = max_retries
        self.group_size = group_size
        self.max_stack = max_stack
        self.lock_wait_s = lock_wait_s
        self.threads = threads or max(1, int(num_cpus))
        self.runtime_env = runtime_env

    def describe(self) -> str:
        where = self.address or f"local instance ({self.local_cpus or 'all'} CPUs)"
        per = f"{self.group_size} block(s) stacked" if self.group_size else "1 block"
        gpus = f" / {self.num_gpus:g} GPU" if self.num_gpus else ""
        return (
            f"ray: {where}; {per} per task, {self.num_cpus:g} CPU{gpus} per task, "
            f"{self.max_retries} retries"
        )

    def _connect(self, ray: Any) -> bool:
        """Initialise Ray unless it already is; True if this call started it."""
        if ray.is_initialized():
            return False
        import logging

        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if self.runtime_env:
            kwargs["runtime_env"] = self.runtime_env
        if self.address:
            kwargs["address"] = self.address
        elif self.local_cpus:
            kwargs["num_cpus"] = self.local_cpus
        try:
            ray.init(**kwargs)
        except (ConnectionError, TimeoutError) as e:
            where = self.address or "a local instance"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PSMError(f"cannot start or reach Ray at {where}: {first}") from None
        return True

    def run(self, run: Run, blocks: list[int]) -> list[BlockOutcome]:
        if not blocks:
            return []
        ray = import_ray()
        started = self._connect(ray)
        try:
            return self._run(ray, run, blocks)
        finally:
            if started:
                ray.shutdown()

    def _tasks(self, blocks: list[int]) -> list[list[int]]:
        g = self.group_size or 1
        return [blocks[i : i + g] for i in range(0, len(blocks), g)]

    def _run(self, ray: Any, run: Run, blocks: list[int]) -> list[BlockOutcome]:
        remote = ray.remote(train_task).options(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.max_retries,
            retry_exceptions=True, name="psm-block",
        )  # fmt: skip
        path = str(Path(run.path).resolve())
        refs = {
            remote.remote(
                path, task, stacked=self.group_size is not None, max_stack=self.max_stack,
                threads=self.threads, lock_wait_s=self.lock_wait_s,
            ): task
            for task in self._tasks(blocks)
        }  # fmt: skip
        outcomes: dict[int, BlockOutcome] = {}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
                for ref in done:
                    self._collect(ray, ref, refs[ref], outcomes)
        except KeyboardInterrupt:
            # a cancelled task gets KeyboardInterrupt as SIGINT: train_block saves and stops
            for ref in pending:
                ray.cancel(ref)
            for ref in pending:
                self._collect(ray, ref, refs[ref], outcomes, timeout=60.0)
        outs = [outcomes.get(b) or BlockOutcome(b, "interrupted", error="not run") for b in blocks]
        for o in outs:
            note_failure(run, o)  # e.g. every attempt's worker died: psm status says so
        return outs

    def _collect(
        self,
        ray: Any,
        ref: Any,
        task: list[int],
        outcomes: dict[int, BlockOutcome],
        timeout: float | None = None,
    ) -> None:
        """Store the outcomes of a finished task (or why it has none)."""
        from ray import exceptions as rex

        try:
            for o in ray.get(ref, timeout=timeout):
                outcomes[o.block] = o
            return
        except (rex.TaskCancelledError, rex.GetTimeoutError, KeyboardInterrupt):
            state, error = "interrupted", "cancelled"
        except rex.RayTaskError as e:
            cause = e.cause if e.cause is not None else e
            msg = str(cause).strip().splitlines()
            state = "failed"
            error = f"{type(cause).__name__}: {msg[0] if msg else ''} ({self._tries()})"
        except rex.RayError as e:
            msg = str(e).strip().splitlines()
            state = "failed"
            error = f"{type(e).__name__}: {msg[0] if msg else ''} ({self._tries()})"
        for b in task:
            outcomes[b] = BlockOutcome(b, state, error=error)

    def _tries(self) -> str:
        return f"{self.max_retries + 1} attempt(s)"


class RaySpec(ExecutorSpec):
    """``executor: {name: ray}``: Ray tasks on an existing cluster or a local instance."""

    name: Literal["ray"] = "ray"
    address: str | None = None  # 'auto', host:port or ray://...; None starts a local Ray
    local_cpus: int | None = Field(None, ge=1)  # CPUs of the local Ray psm starts
    num_cpus: float = Field(1.0, gt=0)  # CPUs per task (its torch threads, rounded down)
    num_gpus: float = Field(0.0, ge=0)  # GPUs per task (a fraction shares a GPU)
    max_retries: int = Field(3, ge=0)  # retries of a task that raised or whose worker died
    group_size: int | None = Field(None, ge=1)  # blocks per task, trained stacked
    ensemble_size: int | None = Field(None, ge=1)  # most blocks per stack of a grouped task
    lock_wait_s: float = Field(150.0, ge=0)  # wait for a lock held on another host

    flag_group = "ray executor (overrides executor.* of the config)"
    flags = (
        WORKERS.setting(None),  # sizes a local instance: see with_flags
        MAX_STACK,
        Flag("--address", "address", "cluster address: 'auto', host:port or ray://host:port "
             "(default: start a local Ray instance)"),
        Flag("--local-cpus", "local_cpus", "CPUs of the local Ray instance psm starts",
             type=int, metavar="N"),
        Flag("--num-cpus", "num_cpus", "CPUs per task (default 1)", type=float, metavar="N"),
        Flag("--num-gpus", "num_gpus", "GPUs per task (default 0; 0.5 shares a GPU)",
             type=float, metavar="N"),
        Flag("--max-retries", "max_retries", "retries of a failed task (default 3)", type=int,
             metavar="N"),
        Flag("--group-size", "group_size", "blocks per task, trained stacked (default: 1 "
             "block/task)", type=int, metavar="G"),
    )  # fmt: skip

    def with_flags(self, options: Mapping[str, Any]) -> Self:
        """The flags applied; ``--workers`` sizes a local instance at ``workers x num_cpus``
        CPUs when neither ``local_cpus`` nor ``address`` is set."""
        spec = super().with_flags(options)
        workers = options.get("workers")
        if workers and spec.local_cpus is None and spec.address is None:
            spec = spec.model_copy(update={"local_cpus": math.ceil(workers * spec.num_cpus)})
        return spec

    def build(self, config: RunConfig) -> RayExecutor:
        import_ray()  # a missing Ray fails here, before anything is written
        return RayExecutor(
            address=self.address, local_cpus=self.local_cpus, num_cpus=self.num_cpus,
            num_gpus=self.num_gpus, max_retries=self.max_retries, group_size=self.group_size,
            max_stack=self.ensemble_size, lock_wait_s=self.lock_wait_s,
            threads=config.train.threads,
        )  # fmt: skip
