"""``slurm``: a SLURM job array through submitit, one block per array task.

``psm train CONFIG --executor slurm`` submits one array task per unfinished block with the
resources of ``executor.slurm`` (or the ``--slurm-*`` flags), records the job of every block in
``<run>/jobs.json`` (``psm status`` shows their SLURM state), and waits with a progress bar read
from the block status files; ``--no-wait`` submits and returns.

Pre-emption and time-outs: submitit has SLURM send ``USR2`` to a task before its time limit
(``--signal USR2@90``) and, on pre-emption, ``SIGTERM`` and ``USR2``. An array task
(:class:`BlockJob`) turns either into a clean stop of
:func:`~psm.training.train.train_block`, which saves
a checkpoint at the current step, then has submitit requeue it (``checkpoint`` /
``scontrol requeue``); the requeued task resumes the block from that checkpoint. A task killed
outright resumes from its last periodic checkpoint when the same command runs again.

``executor.slurm.cluster: local`` (or ``debug``) runs the same job array with submitit's local
executor (``debug``: inside this process) for trying it out and for tests. submitit is an
optional extra: ``pip install 'psm[slurm]'``; it is imported only when used.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..errors import PSMError
from ..runs.run import Run
from ..spec import Section
from ..training.stop import StopRequest
from ..training.train import BlockOutcome, note_failure
from .base import Executor, ExecutorSpec
from .flags import Flag
from .slurm_jobs import record_jobs
from .task import train_task

if TYPE_CHECKING:
    from ..runs.config import RunConfig

INSTALL_HINT = "pip install 'psm[slurm]'"


def import_submitit() -> Any:
    """The ``submitit`` module, or a one-line :class:`~psm.errors.PSMError` on how to install it."""
    try:
        import submitit
    except ImportError:
        raise PSMError(f"the slurm executor needs submitit: {INSTALL_HINT}") from None
    return submitit


class SlurmConfig(Section):
    """``executor.slurm``: the SLURM job array submitted through submitit (one block per task)."""

    cluster: Literal["slurm", "local", "debug"] = "slurm"  # local/debug: submitit's own, here
    partition: str | None = None  # sbatch --partition
    time_min: int = Field(60, ge=1)  # wall-clock limit of one task, minutes (--time)
    mem_gb: float | None = Field(None, gt=0)  # memory per task (--mem)
    cpus_per_task: int = Field(1, ge=1)  # --cpus-per-task; also the torch threads of a task
    gpus_per_node: int = Field(0, ge=0)  # --gpus-per-node
    account: str | None = None  # --account
    qos: str | None = None  # --qos
    array_parallelism: int | None = Field(None, ge=1)  # most tasks running at once (--array %N)
    folder: str | None = None  # submitit's pickles and logs; default <run>/slurm
    max_timeouts: int = Field(3, ge=0)  # requeues after hitting the time limit (pre-emption: any)
    signal_delay_s: int = Field(90, ge=1)  # time-out warning signal this long before the limit
    setup: list[str] = Field(default_factory=list)  # shell lines before a task (module load ...)
    extra: dict[str, Any] = Field(default_factory=dict)  # other sbatch options, e.g. constraint
    wait: bool = True  # wait for the jobs with a progress bar; False: submit and return


def _training() -> bool:
    """Whether train_block's stop handler is installed (a SIGTERM now is a clean stop)."""
    return isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), StopRequest)


class BlockJob:
    """What one array task runs: train one block, requeue it when pre-empted or timed out.

    submitit calls :meth:`checkpoint` (it duck-types ``submitit.helpers.Checkpointable``) to
    get the call to requeue; the block's progress itself lives in the run directory.

    Args:
        threads: torch threads of the task.
        lock_wait_s: see :func:`psm.executors.task.train_task`.
    """

    def __init__(self, threads: int | None = None, lock_wait_s: float = 150.0) -> None:
        self.threads = threads
        self.lock_wait_s = lock_wait_s

    def __call__(self, run_path: str, block: int) -> BlockOutcome:
        import submitit

        usr = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        requeue = signal.getsignal(usr)  # submitit's checkpoint-and-requeue, inside a job
        in_job = callable(requeue)
        preempted = False

        def on_preempt(signum: int, frame: Any) -> None:
            nonlocal preempted
            preempted = True
            if _training():
                signal.raise_signal(signal.SIGTERM)  # stop at the next step with a checkpoint
            else:
                requeue(signum, frame)  # type: ignore[operator]  # not training: requeue now

        rec = Run.open(run_path).ledger.read(block) or {}
        print(
            f"psm: block {block} of {run_path}: from step {rec.get('checkpoint_step') or 0}, "
            f"pid {os.getpid()}",
            flush=True,
        )
        if in_job:
            signal.signal(usr, on_preempt)
        try:
            (out,) = train_task(
                run_path, [block], threads=self.threads, lock_wait_s=self.lock_wait_s
            )
        finally:
            if in_job:
                signal.signal(usr, requeue)
        print(f"psm: block {block}: {out.state} at step {out.step}", flush=True)
        if in_job and preempted and out.state == "interrupted":
            requeue(usr, None)  # type: ignore[operator]  # calls checkpoint(), requeues, exits
        return out

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The call submitit requeues: the same block (it resumes from its checkpoint)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


class SlurmExecutor(Executor):
    """Train blocks as a SLURM job array (one block per task) through submitit.

    Args:
        slurm: the resources and behaviour (``executor.slurm`` of the config).
        job_name: the SLURM job name.
        threads: torch threads per task (default: ``cpus_per_task``).
        lock_wait_s: see :func:`psm.executors.task.train_task`.
        poll_s: seconds between looks at the jobs while waiting.
    """

    name = "slurm"

    def __init__(
        self,
        slurm: SlurmConfig | None = None,
        *,
        job_name: str = "psm",
        threads: int | None = None,
        lock_wait_s: float = 150.0,
        poll_s: float = 2.0,
    ) -> None:
        self.slurm = slurm or SlurmConfig()
        self.job_name = job_name
        self.threads = threads or self.slurm.cpus_per_task
        self.lock_wait_s = lock_wait_s
        self.poll_s = poll_s

    def describe(self) -> str:
        s = self.slurm
        parts = [f"{s.time_min} min", f"{s.cpus_per_task} CPU"]
        parts += [f"{s.gpus_per_node} GPU"] if s.gpus_per_node else []
        parts += [f"{s.mem_gb:g} GB"] if s.mem_gb else []
        parts += [f"partition {s.partition}"] if s.partition else []
        parts += [f"at most {s.array_parallelism} at once"] if s.array_parallelism else []
        where = "" if s.cluster == "slurm" else f" (submitit {s.cluster} executor)"
        return f"slurm{where}: job array, 1 block per task; {', '.join(parts)} per task"

    def parameters(self) -> dict[str, Any]:
        """The ``submitit.AutoExecutor.update_parameters`` keywords for these resources."""
        s = self.slurm
        params: dict[str, Any] = {
            "name": self.job_name,
            "timeout_min": s.time_min,
            "nodes": 1,
            "tasks_per_node": 1,
            "cpus_per_task": s.cpus_per_task,
            "gpus_per_node": s.gpus_per_node,
            "slurm_signal_delay_s": s.signal_delay_s,
        }
        optional = {
            "mem_gb": s.mem_gb,
            "slurm_partition": s.partition,
            "slurm_account": s.account,
            "slurm_qos": s.qos,
            "slurm_array_parallelism": s.array_parallelism,
            "slurm_setup": list(s.setup) or None,
            "slurm_additional_parameters": dict(s.extra) or None,
        }
        params |= {k: v for k, v in optional.items() if v is not None}
        return params

    def folder(self, run: Run) -> Path:
        """Where submitit keeps its pickles and the task logs."""
        return Path(self.slurm.folder or run.path / "slurm").resolve()

    def check_cluster(self) -> None:
        """Refuse ``cluster: slurm`` where there is no ``sbatch`` (a one-line PSMError)."""
        if self.slurm.cluster == "slurm" and shutil.which("sbatch") is None:
            raise PSMError(
                "the slurm executor found no sbatch here: run psm on a SLURM login node, or "
                "use --slurm-cluster local to try the job array on this machine"
            )

    def make_submitit_executor(self, folder: Path) -> Any:
        """The configured ``submitit.AutoExecutor`` for ``folder``."""
        submitit = import_submitit()
        cluster = self.slurm.cluster
        self.check_cluster()
        n = self.slurm.max_timeouts
        kwargs = {"slurm_max_num_timeout": n, "local_max_num_timeout": n}
        ex = submitit.AutoExecutor(folder=folder, cluster=cluster, **kwargs)
        ex.update_parameters(**self.parameters())
        return ex

    def run(self, run: Run, blocks: list[int]) -> list[BlockOutcome]:
        if not blocks:
            return []
        folder = self.folder(run)
        ex = self.make_submitit_executor(folder)
        path = str(Path(run.path).resolve())
        task = BlockJob(threads=self.threads, lock_wait_s=self.lock_wait_s)
        try:
            jobs = ex.map_array(task, [path] * len(blocks), blocks)
        except Exception as e:  # sbatch refused (bad partition, account, ...): say why
            lines = str(e).strip().splitlines()
            raise PSMError(f"SLURM refused the job array: {lines[-1] if lines else e}") from None
        cluster = self.slurm.cluster
        record_jobs(run, cluster, folder, {b: str(j.job_id) for b, j in zip(blocks, jobs)})
        if cluster != "debug":
            ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
            print(
                f"slurm: {len(jobs)} task(s) submitted as job {', '.join(ids)}; logs in {folder}",
                file=sys.stderr,
            )
        if not self.slurm.wait:
            return [BlockOutcome(b, "submitted") for b in blocks]
        outs = self._wait(dict(zip(blocks, jobs)))
        for o in outs:
            note_failure(run, o)  # e.g. a task killed by SLURM: psm status says so
        return outs

    def _wait(self, jobs: dict[int, Any]) -> list[BlockOutcome]:
        outcomes: dict[int, BlockOutcome] = {}
        pending = dict(jobs)
        try:
            while pending:
                for b, job in list(pending.items()):
                    if job.done():  # debug: runs the task now, in this process
                        outcomes[b] = _outcome(b, job)
                        del pending[b]
                if pending:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            # cancelled tasks get a signal that train_block turns into a checkpoint and a stop
            for job in pending.values():
                job.cancel(check=False)
            deadline = time.monotonic() + 30.0
            for b, job in pending.items():
                while not job.done() and time.monotonic() < deadline:
                    time.sleep(0.5)
                outcomes[b] = BlockOutcome(b, "interrupted", error=f"job {job.job_id} cancelled")
        return [outcomes[b] for b in jobs]


def _outcome(block: int, job: Any) -> BlockOutcome:
    """A finished job's outcome, or why it has none, in one line."""
    from submitit.core.utils import UncompletedJobError

    try:
        out = job.result()
    except UncompletedJobError as e:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else type(e).__name__
        return BlockOutcome(block, "failed", error=f"job {job.job_id}: {why}")
    if isinstance(out, BlockOutcome):
        return out
    return BlockOutcome(block, "failed", error=f"job {job.job_id} returned {out!r}")


class SlurmSpec(ExecutorSpec):
    """``executor: {name: slurm}``: a SLURM job array through submitit, one block per task."""

    name: Literal["slurm"] = "slurm"
    lock_wait_s: float = Field(150.0, ge=0)  # wait for a lock held on another host
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)  # the job array's resources

    flag_group = "slurm executor (overrides executor.slurm.* of the config)"
    flags = (
        Flag("--slurm-cluster", "slurm.cluster", "slurm: sbatch; local/debug: submitit's "
             "executors on this machine (for tests)", choices=["slurm", "local", "debug"]),
        Flag("--slurm-partition", "slurm.partition", "partition (sbatch --partition)",
             metavar="NAME"),
        Flag("--slurm-time", "slurm.time_min", "time limit per task, minutes", type=int,
             metavar="MIN"),
        Flag("--slurm-mem-gb", "slurm.mem_gb", "memory per task, GB", type=float, metavar="GB"),
        Flag("--slurm-cpus", "slurm.cpus_per_task", "CPUs per task", type=int, metavar="N"),
        Flag("--slurm-gpus", "slurm.gpus_per_node", "GPUs per task (--gpus-per-node)", type=int,
             metavar="N"),
        Flag("--slurm-account", "slurm.account", "account (sbatch --account)", metavar="NAME"),
        Flag("--slurm-qos", "slurm.qos", "quality of service (sbatch --qos)", metavar="NAME"),
        Flag("--slurm-array-parallelism", "slurm.array_parallelism", "most tasks running at "
             "once", type=int, metavar="N"),
        Flag("--slurm-folder", "slurm.folder", "submitit pickles and logs (default: "
             "<run>/slurm)", metavar="DIR"),
        Flag("--no-wait", "slurm.wait", "submit the job array and return (follow it with psm "
             "status)", dest="slurm_wait", action="store_false", default=None),
    )  # fmt: skip

    def build(self, config: RunConfig) -> SlurmExecutor:
        import_submitit()  # a missing submitit fails here, before anything is written
        ex = SlurmExecutor(
            self.slurm, job_name=f"psm-{config.name}", threads=config.train.threads,
            lock_wait_s=self.lock_wait_s,
        )  # fmt: skip
        ex.check_cluster()  # before anything is written
        return ex
