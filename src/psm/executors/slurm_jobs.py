"""The jobs the slurm executor submitted, and the scheduler's states of them.

The slurm executor records the job of every block it submits in ``<run>/jobs.json``
(:func:`record_jobs`); :func:`job_states` turns that into the job column of ``psm status``,
asking ``sacct`` for SLURM jobs (:func:`parse_sacct`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from ..runs.atomic import atomic_write_json
from ..runs.run import Run

JOBS_FILE = "jobs.json"


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
