"""``psm status RUN``: the state of every block of a run, from the status files on disk."""

from __future__ import annotations

import argparse
import json
import time


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the state of every block of a run")
    p.add_argument("run", help="run directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)


def _fmt_time(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def cmd_status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..runs.run import Run

    run = Run.open(args.run)
    statuses = run.ledger.statuses()
    extra = _cluster_states(run)
    if args.json:
        rows = [asdict(s) | ({"job_state": extra.get(s.block)} if extra else {}) for s in statuses]
        print(json.dumps({"run": str(run.path), "hash": run.hash, "blocks": rows}, indent=1))
        return 0
    cfg = run.config
    print(
        f"run {run.path}  config {run.hash}  data {cfg.data.name}  process {cfg.process.name}  "
        f"{run.partition.kind} x{run.num_blocks}  net {cfg.net.name}"
    )
    now = time.time()
    head = f"{'block':>5}  {'interval':<18} {'state':<8} {'steps':>17}  {'last loss':>10}  "
    head += f"{'wall':>8}  {'checkpoint':>14}"
    if extra:
        head += f"  {'job':<12}"
    print(head)
    for s in statuses:
        loss = f"{s.last_loss:.5f}" if s.last_loss is not None else "-"
        ck = "-"
        if s.checkpoint_time:
            ck = f"{s.checkpoint_step} ({_ago(now - s.checkpoint_time)})"
        line = f"{s.block:>5}  {s.span:<18} {s.state:<8} {s.step:>8}/{s.target:<8}  {loss:>10}  "
        line += f"{_fmt_time(s.wall_time):>8}  {ck:>14}"
        if extra:
            line += f"  {extra.get(s.block, '-'):<12}"
        print(line)
        if s.state == "failed" and s.error:
            print(f"{'':>7}{s.error}")
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    print("; ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _cluster_states(run) -> dict[int, str]:
    """Scheduler job states per block, where an executor recorded jobs (e.g. SLURM)."""
    from ..executors.slurm_jobs import job_states

    return job_states(run)
