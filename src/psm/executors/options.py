"""Command-line options of the cluster executors, and the scheduler states they record.

The ray and slurm flags of ``psm train`` override fields of the config's ``executor`` section
(``--num-cpus`` is ``executor.num_cpus``, ``--slurm-partition`` is
``executor.slurm.partition``, ...). The slurm executor records the job of every block it submits
in ``<run>/jobs.json``; :func:`job_states` turns that into the job column of ``psm status``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from ..runs.atomic import atomic_write_json
from ..runs.run import Run

JOBS_FILE = "jobs.json"

# flag dest -> field of executor.slurm
SLURM_FLAGS = {
    "slurm_cluster": "cluster",
    "slurm_partition": "partition",
    "slurm_time": "time_min",
    "slurm_mem_gb": "mem_gb",
    "slurm_cpus": "cpus_per_task",
    "slurm_gpus": "gpus_per_node",
    "slurm_account": "account",
    "slurm_qos": "qos",
    "slurm_array_parallelism": "array_parallelism",
    "slurm_folder": "folder",
    "slurm_wait": "wait",
}
# flag dest -> field of executor (ray)
RAY_FLAGS = ("address", "local_cpus", "num_cpus", "num_gpus", "max_retries", "group_size")


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for ``psm train`` that configure the ray and slurm executors."""
    g = p.add_argument_group("ray executor (overrides executor.* of the config)")
    g.add_argument("--address", help="cluster address: 'auto', host:port or ray://host:port "
                   "(default: start a local Ray instance)")  # fmt: skip
    g.add_argument(
        "--local-cpus", type=int, metavar="N", help="CPUs of the local Ray instance psm starts"
    )
    g.add_argument("--num-cpus", type=float, metavar="N", help="CPUs per task (default 1)")
    g.add_argument(
        "--num-gpus", type=float, metavar="N", help="GPUs per task (default 0; 0.5 shares a GPU)"
    )
    g.add_argument(
        "--max-retries", type=int, metavar="N", help="retries of a failed task (default 3)"
    )
    g.add_argument(
        "--group-size",
        type=int,
        metavar="G",
        help="blocks per task, trained stacked (default: 1 block/task)",
    )
    s = p.add_argument_group("slurm executor (overrides executor.slurm.* of the config)")
    s.add_argument(
        "--slurm-cluster",
        choices=["slurm", "local", "debug"],
        help="slurm: sbatch; local/debug: submitit's executors on this machine (for tests)",
    )
    s.add_argument("--slurm-partition", metavar="NAME", help="partition (sbatch --partition)")
    s.add_argument("--slurm-time", type=int, metavar="MIN", help="time limit per task, minutes")
    s.add_argument("--slurm-mem-gb", type=float, metavar="GB", help="memory per task, GB")
    s.add_argument("--slurm-cpus", type=int, metavar="N", help="CPUs per task")
    s.add_argument("--slurm-gpus", type=int, metavar="N", help="GPUs per task (--gpus-per-node)")
    s.add_argument("--slurm-account", metavar="NAME", help="account (sbatch --account)")
    s.add_argument("--slurm-qos", metavar="NAME", help="quality of service (sbatch --qos)")
    s.add_argument(
        "--slurm-array-parallelism", type=int, metavar="N", help="most tasks running at once"
    )
    s.add_argument(
        "--slurm-folder", metavar="DIR", help="submitit pickles and logs (default: <run>/slurm)"
    )
    s.add_argument(
        "--no-wait",
        dest="slurm_wait",
        action="store_false",
        default=None,
        help="submit the job array and return (follow it with psm status)",
    )


def cluster_options(args: argparse.Namespace) -> dict[str, Any]:
    """The cluster flags given on the command line, by option name (None: not given)."""
    names = (*RAY_FLAGS, *SLURM_FLAGS)
    return {n: getattr(args, n, None) for n in names}


def flag_name(option: str) -> str:
    """``slurm_mem_gb`` -> ``--slurm-mem-gb`` (``slurm_wait`` -> ``--no-wait``)."""
    return "--no-wait" if option == "slurm_wait" else "--" + option.replace("_", "-")


def override(section: BaseModel, updates: dict[str, Any], flags: dict[str, str]) -> Any:
    """A copy of a config section with ``updates`` (field -> value) applied and validated.

    Args:
        section: the config section (e.g. ``config.executor``).
        updates: new values by field name; None values are ignored.
        flags: field name -> the flag that set it, for the error message.

    Raises:
        ConfigError: one line naming the flag, e.g. ``--num-cpus: Input should be greater than 0``.
    """
    updates = {k: v for k, v in updates.items() if v is not None}
    if not updates:
        return section
    try:
        return type(section).model_validate({**section.model_dump(), **updates})
    except ValidationError as e:
        first = e.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        where = flags.get(field, field or "executor")
        raise ConfigError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None


# --------------------------------------------------------------------------- job records
def jobs_path(run: Run) -> Path:
    return run.path / JOBS_FILE


def read_jobs(run: Run) -> dict[int, dict[str, Any]]:
    """Per block, the latest job recorded for it (empty when none was submitted)."""
    try:
        raw = json.loads(jobs_path(run).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    out = {}
    for k, v in (raw.get("blocks") or {}).items():
        if isinstance(v, dict) and str(k).isdigit():
            out[int(k)] = v
    return out


def record_jobs(run: Run, cluster: str, folder: Path, jobs: dict[int, str]) -> None:
    """Record the job id of each submitted block in ``<run>/jobs.json`` (merged, atomic)."""
    now = time.time()
    blocks = {str(b): v for b, v in read_jobs(run).items()}
    for b, job_id in jobs.items():
        blocks[str(b)] = {
            "job_id": job_id,
            "cluster": cluster,
            "folder": str(folder),
            "submitted": now,
        }
    atomic_write_json(jobs_path(run), {"blocks": blocks})


def job_states(run: Run) -> dict[int, str]:
    """Per block, the scheduler's state of its latest job, e.g. ``RUNNING 4242_3``.

    SLURM states come from ``sacct`` (``?`` where it cannot be asked); jobs of submitit's local
    executor are ``RUNNING`` while their process lives, then ``FINISHED`` (or ``LOST`` when the
    process died before writing a result).
    """
    jobs = read_jobs(run)
    if not jobs:
        return {}
    slurm_ids = [j["job_id"] for j in jobs.values() if j.get("cluster") == "slurm"]
    sacct = _sacct_states(slurm_ids) if slurm_ids else {}
    out = {}
    for b, j in jobs.items():
        job_id, cluster = str(j.get("job_id", "?")), j.get("cluster")
        if cluster == "slurm":
            state = sacct.get(job_id, "?")
        elif cluster == "local":
            state = _local_state(Path(j.get("folder", ".")), job_id)
        else:
            state = "FINISHED"  # debug: ran inside the submitting process
        out[b] = f"{state} {job_id}"
    return out


def _sacct_states(job_ids: list[str]) -> dict[str, str]:
    """``job id -> state`` from sacct, array ranges expanded; empty when sacct is unavailable."""
    if shutil.which("sacct") is None:
        return {}
    mains = sorted({j.split("_")[0] for j in job_ids})
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(mains)]
    try:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_sacct(text)


def parse_sacct(text: str) -> dict[str, str]:
    """Parse ``sacct -n -P -o JobID,State`` lines; ``12_[3-5%2]`` gives 12_3, 12_4 and 12_5."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        job, _, state = line.partition("|")
        state = state.split()[0] if state.strip() else "?"  # "CANCELLED by 0" -> CANCELLED
        m = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job.strip())
        if m is None:
            out[job.strip()] = state
            continue
        for part in m.group(2).split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                out[f"{m.group(1)}_{i}"] = state
    return out


def _local_state(folder: Path, job_id: str) -> str:
    if (folder / f"{job_id}_0_result.pkl").exists():
        return "FINISHED"
    try:
        cmdline = Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return "LOST"
    return "RUNNING" if b"submitit" in cmdline else "LOST"
