"""``psm demo``: SA-DPM against TPSM on TY with the same wall-clock budget, on the local CPU.

Both methods use the paper's settings (appendix H: paper MLP, Adam 1e-3, batch 512, fresh
samples, VP b(t) = 10 t, t0 = 1e-4). SA-DPM trains one time-conditioned net on [t0, 1]; TPSM
trains K nets on K equal sub-intervals, stacked into one vectorized model by the ensemble
trainer, for the same number of seconds. Both are then scored by the exact ODE likelihood
(RK4, block by block) on the same test points and compared with the true entropy of the data,
the floor no model can beat.

The demo folder is resumable: finished runs are reused, and so are their scores (kept in each
run's ``nll.jsonl`` by the experiments' harness, :mod:`~psm.experiments.harness`).

Equal wall-clock is a fair comparison only when both methods get the same machine. Before each
method trains, the demo times a few seconds of its training steps (a calibration, nothing
saved); a method whose achieved speed falls far below its calibration (the machine got busier)
or far below what this project measured on a quiet 2-core machine (:data:`QUIET_RATES`) is
flagged in the table, in ``results.md`` and on stderr, and the block-steps stand beside every
number.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..runs.atomic import atomic_write_text
from ..runs.config import RunConfig, validate_config
from ..runs.run import Run
from ..training.train import StackTrainer
from . import harness

QUIET_RATES = {1: 578.0, 10: 759.0}
"""Block-steps per second of SA-DPM (K = 1) and TPSM-10 (stacked) on a quiet 2-core machine
with 2 threads (``psm bench train``, docs/benchmarks.md), the demo's reference."""
SLOW = 0.5
"""A method is flagged when it trains below this share of its calibration or reference."""
CALIBRATION_SECONDS = 3.0
EVAL_BATCH = 1000
"""Test points per likelihood solve."""


@dataclass
class DemoRow:
    """One line of the demo table."""

    method: str
    blocks: int
    steps_per_block: int
    block_steps: int
    train_seconds: float
    nll: float
    stderr: float
    floor: float | None
    eval_seconds: float
    run: str
    rate: float = 0.0  # achieved block-steps per second of training
    calibration: float = 0.0  # block-steps per second measured just before training
    notes: list[str] = field(default_factory=list)  # speed warnings


def demo_config(
    name: str, blocks: int, out: Path, seconds: float, *, data: str, seed: int, n_test: int,
    steps: int,
) -> RunConfig:  # fmt: skip
    """The paper's 2D setting with a wall-clock budget instead of a step count."""
    return validate_config(
        {
            "name": name,
            "out": str(out),
            "data": {"name": data},
            "process": {"name": "vp", "b_min": 0.0, "b_max": 10.0},
            "partition": {"kind": "equal", "blocks": blocks, "t0": 1e-4},
            "net": {"name": "mlp", "hidden": [100, 150, 100], "activation": "elu"},
            "train": {
                "steps": 10_000_000,
                "max_seconds": seconds,
                "batch_size": 512,
                "lr": 1e-3,
                "seed": seed,
                "checkpoint_every": 5000,
                "log_every": 250,
            },
            "eval": {"n_test": n_test, "steps": steps, "solver": "rk4"},
        }
    )


def calibrate(run: Run, seconds: float = CALIBRATION_SECONDS) -> float:
    """Block-steps per second of a run's own training step, timed for about ``seconds`` on
    throwaway copies of its blocks (nothing is written)."""
    trainer = StackTrainer(run, list(range(run.num_blocks)))
    for _ in range(5):  # warm-up
        trainer.train_step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        trainer.train_step()
        n += 1
    return n * run.num_blocks / (time.perf_counter() - start)


def speed_notes(
    label: str, blocks: int, rate: float, calibration: float, threads: int
) -> list[str]:
    """Warnings when a method trained far slower than measured just before it or than this
    project's quiet reference (which holds for 2 threads on its 2-core machine)."""
    notes = []
    if calibration > 0 and rate < SLOW * calibration:
        notes.append(
            f"{label} trained at {rate:.0f} block-steps/s, {100 * rate / calibration:.0f}% of "
            f"the {calibration:.0f} measured just before it: the machine got busier during "
            "its budget, so equal seconds did not buy equal work"
        )
    ref = QUIET_RATES.get(blocks) if threads == 2 else None
    if ref and rate < SLOW * ref:
        notes.append(
            f"{label} trained at {rate:.0f} block-steps/s, {100 * rate / ref:.0f}% of the "
            f"{ref:.0f} this project measured on a quiet 2-core machine: this machine is busy "
            "or slow, and its NLLs are not those of the README"
        )
    return notes


def _train(run: Run, stacked: bool, progress: bool) -> float:
    """Train a demo run (:func:`~psm.experiments.harness.train`); seconds of training recorded
    in its blocks."""
    todo = run.ledger.not_done(invocation=True)
    harness.train(run, todo, label=f"train {run.config.name}", progress=progress, stacked=stacked)
    return max(s.wall_time for s in run.ledger.statuses())


def run_demo(
    out: str | Path = "psm-demo",
    *,
    seconds: float = 120.0,
    blocks: int = 10,
    data: str = "ty",
    n_test: int = 3000,
    steps: int = 250,
    seed: int = 0,
    threads: int = 2,
    progress: bool = True,
    plots: bool = True,
    grid: int = 100,
) -> list[DemoRow]:
    """Train SA-DPM and TPSM-``blocks`` for ``seconds`` each, evaluate, and write results.

    Args:
        out: the demo folder (runs, plots, results.json, results.md).
        seconds: training wall-clock budget of each method.
        blocks: TPSM blocks (paper appendix F: 10).
        data: dataset name (TY by default).
        n_test: test points for the NLL.
        steps: RK4 steps over [t0, 1] for the NLL (the paper uses 1000; see the README for the
            difference it makes).
        seed: training seed.
        threads: torch threads (both methods get the same).
        progress: progress bars.
        plots: write the figures.
        grid: cells per axis of the density heat maps.

    Returns:
        The table rows, SA first.
    """
    out = Path(out)
    torch.set_num_threads(threads)
    methods = [("SA-DPM", 1, False), (f"TPSM-{blocks}", blocks, True)]
    rows: list[DemoRow] = []
    runs: list[Run] = []
    for label, k, stacked in methods:
        name = "sa" if k == 1 else f"tpsm{k}"
        cfg = demo_config(name, k, out / "runs" / name, seconds, data=data, seed=seed,
                          n_test=n_test, steps=steps)  # fmt: skip
        run = Run.create(cfg)
        fresh = bool(run.ledger.not_done(invocation=True))
        calibration = calibrate(run) if fresh else 0.0
        train_s = _train(run, stacked, progress)
        score = harness.score(run, batch_size=EVAL_BATCH, progress=progress)
        steps_done = [s.step for s in run.ledger.statuses()]
        rate = sum(steps_done) / train_s if train_s > 0 else 0.0
        rows.append(
            DemoRow(
                label, k, min(steps_done), sum(steps_done), train_s, score.nll, score.stderr,
                score.entropy, score.seconds, str(run.path), rate, calibration,
                speed_notes(label, k, rate, calibration, threads),
            )
        )  # fmt: skip
        runs.append(run)
    table = format_table(rows)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "results.json", json.dumps([asdict(r) for r in rows], indent=1))
    if plots:
        from ..viz.demo import demo_figures

        demo_figures(
            runs, [r.method for r in rows], out / "plots", grid=grid, steps=min(steps, 100),
            progress=progress,
        )  # fmt: skip
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """The demo table in markdown, with any speed warnings below it."""
    head = (
        "| method | blocks | steps per block | total block-steps | train wall time | "
        "block-steps/s (calibration) | test NLL (nats) | true-entropy floor |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        floor = f"{r.floor:.3f}" if r.floor is not None else "-"
        cal = f" ({r.calibration:.0f})" if r.calibration else ""
        flag = " ⚠" if r.notes else ""
        lines.append(
            f"| {r.method}{flag} | {r.blocks} | {r.steps_per_block:,} | {r.block_steps:,} | "
            f"{r.train_seconds:.0f} s | {r.rate:.0f}{cal} | {r.nll:.3f} ± {r.stderr:.3f} | "
            f"{floor} |"
        )
    notes = [n for r in rows for n in r.notes]
    if notes:
        lines.append("")
        lines += [f"⚠ {n}." for n in notes]
    return "\n".join(lines)
