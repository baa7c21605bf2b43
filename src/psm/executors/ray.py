"""``ray``: one Ray task per block (or per group of blocks, trained stacked) on a Ray cluster.

The executor connects to an existing cluster (``--address auto`` or ``host:port``) or starts a
local Ray instance (``--local-cpus`` CPUs) and shuts it down afterwards. Every task calls
:func:`train_task`, the same body the SLURM array tasks run:

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
import time
from pathlib import Path
from typing import Any

from ..errors import PSMError
from ..runs.config import RunConfig
from ..runs.lock import held_elsewhere, lock_holder_alive
from ..runs.run import Run
from ..training.train import BlockOutcome, note_failure
from .base import Executor
from .options import RAY_FLAGS, flag_name, override

INSTALL_HINT = "pip install 'psm[ray]'"


def import_ray() -> Any:
    """The ``ray`` module, or a one-line :class:`~psm.errors.PSMError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PSMError(f"the ray executor needs Ray: {INSTALL_HINT}") from None
    return ray


# --------------------------------------------------------------------------- the task body
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
        stacked: train them as one stack with :func:`~psm.ensemble.train_ensemble`; otherwise
            one after another with :func:`~psm.training.train.train_block`.
        max_stack: most blocks per stack.
        threads: torch threads (None: leave torch's default).
        lock_wait_s: how long to wait for a block locked by a holder on ANOTHER machine: a
            holder killed with its machine (or whose retry landed elsewhere) keeps a fresh
            heartbeat for up to two minutes, after which its lock is taken over.
        poll_s: seconds between looks at such a lock.

    Returns:
        One outcome per block. A :class:`~psm.errors.PSMError` (which a retry would not fix)
        becomes ``failed`` outcomes; any other exception propagates, so the engine retries it.
    """
    import torch

    from ..training.train import train_block, train_ensemble

    if threads:
        torch.set_num_threads(threads)
    run = Run.open(run_path)

    def once(ids: list[int]) -> list[BlockOutcome]:
        if stacked:
            try:
                return train_ensemble(run, ids, max_stack=max_stack)
            except PSMError as e:
                return [BlockOutcome(b, "failed", error=str(e)) for b in ids]
        outs: list[BlockOutcome] = []
        for i, b in enumerate(ids):
            try:
                outs.append(train_block(run, b))
            except PSMError as e:
                outs.append(BlockOutcome(b, "failed", error=str(e)))
            if outs[-1].state == "interrupted":
                outs += [BlockOutcome(c, "interrupted", error="not run") for c in ids[i + 1 :]]
                break
        return outs

    outs = {o.block: o for o in once(list(blocks))}
    deadline = time.monotonic() + lock_wait_s

    def worth_waiting(b: int) -> bool:
        path = run.lock_path(b)
        return held_elsewhere(path) or not lock_holder_alive(path)

    while time.monotonic() < deadline:
        waiting = [b for b, o in outs.items() if o.state == "locked" and worth_waiting(b)]
        if not waiting:
            break
        free = [b for b in waiting if not lock_holder_alive(run.lock_path(b))]
        if free:
            outs.update({o.block: o for o in once(free)})
        else:
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    return [outs[b] for b in blocks]


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
        lock_wait_s: see :func:`train_task`.
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

    @classmethod
    def from_config(cls, config: RunConfig, **options: Any) -> RayExecutor:
        """Build from the config's ``executor`` section, overridden by command-line options.

        ``workers`` (``--workers``) sizes a local instance at ``workers x num_cpus`` CPUs when
        ``local_cpus`` is not set; ``max_stack`` caps a grouped task's stack.
        """
        import_ray()  # a missing Ray fails here, before anything is written
        ex = override(
            config.executor,
            {k: options.get(k) for k in RAY_FLAGS},
            {k: flag_name(k) for k in RAY_FLAGS},
        )
        local_cpus = ex.local_cpus
        if local_cpus is None and ex.address is None and options.get("workers"):
            local_cpus = math.ceil(options["workers"] * ex.num_cpus)
        return cls(
            address=ex.address, local_cpus=local_cpus, num_cpus=ex.num_cpus,
            num_gpus=ex.num_gpus, max_retries=ex.max_retries, group_size=ex.group_size,
            max_stack=options.get("max_stack") or ex.ensemble_size, lock_wait_s=ex.lock_wait_s,
            threads=config.train.threads,
        )  # fmt: skip

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
