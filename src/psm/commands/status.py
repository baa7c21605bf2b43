"""``psm status RUN``: the state of every block of a run, from the status files on disk.

Beside each block's state, steps, loss, wall time and checkpoint: its last held-out denoising
bound (``heldout`` in the block's metrics lines, written by the trainer every
``train.heldout_every`` steps and at the end of each training call; :mod:`psm.core.heldout`: the
block's KL term up to a constant) and that value's recent slope, per 1000 steps (least squares
over the last :data:`SLOPE_POINTS` measurements): a block whose slope is near 0 has stopped
gaining from more steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SLOPE_POINTS = 5
"""Held-out measurements the slope is fitted over (the most recent ones)."""


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
    signal = {s.block: heldout_signal(run.layout.metrics(s.block)) for s in statuses}
    if args.json:
        rows = [
            asdict(s) | signal[s.block] | ({"job_state": extra.get(s.block)} if extra else {})
            for s in statuses
        ]
        plan = _budget_summary(run)
        print(json.dumps({"run": str(run.path), "hash": run.hash, "blocks": rows}
                         | ({"budget": plan} if plan else {}), indent=1))  # fmt: skip
        return 0
    cfg = run.config
    print(
        f"run {run.path}  config {run.hash}  data {cfg.data.name}  process {cfg.process.name}  "
        f"{run.partition.kind} x{run.num_blocks}  net {cfg.net.name}"
    )
    if cfg.train.init_from is not None:  # a warm start: where the blocks started
        src = cfg.train.init_from
        which = f"{src.run}:{src.block}" if src.block is not None else src.run
        print(f"warm start: from {which} (config {src.hash}; each block's source in --json)")
    if cfg.partition.chosen_by:
        print(f"splits: {cfg.partition.chosen_by}")
    plan = _budget_summary(run)
    if plan:
        last = plan["last_round"] or {"kind": "-", "reason": "no round yet"}
        print(
            f"budget {plan['budget']}: {plan['spent']}/{plan['total']} block-steps in "
            f"{plan['rounds']} rounds; last: {last['kind']} ({last['reason']}); {plan['file']}"
        )
    now = time.time()
    head = f"{'block':>5}  {'interval':<18} {'state':<8} {'steps':>17}  {'last loss':>10}  "
    head += f"{'wall':>8}  {'checkpoint':>14}  {'held-out':>10} {'slope/1k':>9}"
    if extra:
        head += f"  {'job':<12}"
    print(head)
    for s in statuses:
        loss = f"{s.last_loss:.5f}" if s.last_loss is not None else "-"
        ck = "-"
        if s.pruned:  # only the final weights are kept (psm prune)
            ck = "pruned"
        elif s.checkpoint_time:
            ck = f"{s.checkpoint_step} ({_ago(now - s.checkpoint_time)})"
        line = f"{s.block:>5}  {s.span:<18} {s.state:<8} {s.step:>8}/{s.target:<8}  {loss:>10}  "
        line += f"{_fmt_time(s.wall_time):>8}  {ck:>14}  " + _fmt_signal(signal[s.block])
        if extra:
            line += f"  {extra.get(s.block, '-'):<12}"
        print(line)
        if s.state == "failed" and s.error:
            print(f"{'':>7}{s.error}")
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    print("; ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if any(v["heldout"] is not None for v in signal.values()):
        print(
            "held-out: each block's denoising bound on a fixed held-out batch (its KL term up "
            f"to a constant, nats); slope per 1000 steps over the last {SLOPE_POINTS} values"
        )
    return 0


def _budget_summary(run) -> dict | None:
    """A budget run's plan in brief (:mod:`psm.auto.budget`), or None."""
    from ..auto.budget import plan_path, read_plan

    plan = read_plan(run.path)
    if plan is None or run.config.train.budget is None:
        return None
    last = plan.rounds[-1] if plan.rounds else None
    return {
        "budget": run.config.train.budget.total, "total": plan.total, "spent": plan.spent(),
        "rounds": len(plan.rounds), "file": str(plan_path(run.path)),
        "last_round": {"kind": last.kind, "reason": last.reason} if last else None,
    }  # fmt: skip


def heldout_signal(path: Path, points: int = SLOPE_POINTS) -> dict[str, float | int | None]:
    """A block's held-out series from its metrics file: the last value, its step, and the
    least-squares slope per 1000 steps over the last ``points`` measurements.

    Returns:
        ``{"heldout", "heldout_step", "heldout_slope"}``; None where there is no value (the
        slope needs two measurements at different steps).
    """
    by_step: dict[int, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if '"heldout"' not in line:
                continue
            try:
                rec = json.loads(line)
                by_step[int(rec["step"])] = float(rec["heldout"])
            except (ValueError, KeyError, TypeError):
                continue
    if not by_step:
        return {"heldout": None, "heldout_step": None, "heldout_slope": None}
    steps = sorted(by_step)[-points:]
    last = steps[-1]
    return {"heldout": by_step[last], "heldout_step": last,
            "heldout_slope": _slope(steps, [by_step[s] for s in steps])}  # fmt: skip


def _slope(steps: list[int], values: list[float]) -> float | None:
    """Least-squares slope of ``values`` against ``steps``, per 1000 steps."""
    n = len(steps)
    if n < 2:
        return None
    ms, mv = sum(steps) / n, sum(values) / n
    den = sum((s - ms) ** 2 for s in steps)
    if den == 0:
        return None
    return 1000.0 * sum((s - ms) * (v - mv) for s, v in zip(steps, values)) / den


def _fmt_signal(sig: dict[str, float | int | None]) -> str:
    value, slope = sig["heldout"], sig["heldout_slope"]
    v = f"{value:.5g}" if value is not None else "-"
    sl = f"{slope:+.3g}" if slope is not None else "-"
    return f"{v:>10} {sl:>9}"


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
