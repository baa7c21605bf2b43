"""Likelihood evaluation time: RK4 step counts, and SA vs TPSM vs DPSM at the same steps.

The time of an ODE likelihood does not depend on how well the nets are trained, so the models
here are freshly initialised paper MLPs (one per block) assembled exactly as a trained run
would be (:class:`psm.core.model.BlockModel`); every model scores the same TY test points with the
exact trace, side by side in one run.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..core.likelihood import evaluate_nll
from ..core.model import BlockModel
from ..core.ode import SolverSettings
from ..runs.config import validate_config
from ..runs.run_parts import Parts
from .report import markdown_table

METHODS = {
    "SA": {"kind": "equal", "blocks": 1},
    "TPSM-10": {"kind": "equal", "blocks": 10},
    "TPSM-200": {"kind": "equal", "blocks": 200},
    "DPSM-100": {"kind": "grid", "points": 100},
    "DPSM-1000": {"kind": "grid", "points": 1000},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=500, help="test points per evaluation")
    p.add_argument("--steps", type=int, default=1000, help="RK4 steps for the method comparison")
    p.add_argument("--sweep", default="100,250,500,1000", help="RK4 step counts for SA")
    p.add_argument("--methods", default=",".join(METHODS), help="methods to compare")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--repeats", type=int, default=3, help="rounds over all methods; the best time counts"
    )


def build_model(method: str, seed: int = 0) -> BlockModel:
    """An untrained model of ``method`` with the paper's MLP in every block."""
    parts = Parts(validate_config({"name": method, "partition": METHODS[method]}))
    torch.manual_seed(seed)
    nets = [parts.new_net().eval().requires_grad_(False) for _ in range(parts.partition.num_blocks)]
    return BlockModel(parts.process, parts.partition, nets, shape=parts.shape)


def time_nll(model: BlockModel, x: torch.Tensor, steps: int) -> float:
    """Wall time (s) of an exact-trace RK4 NLL of ``x`` in one batch."""
    solver = SolverSettings("rk4", steps)
    res = evaluate_nll(model, x, batch_size=x.shape[0], solver=solver, progress=False)
    return res.seconds


def best_times(jobs: dict[str, tuple[BlockModel, int]], x: torch.Tensor, rounds: int) -> dict:
    """Best time of each job over ``rounds`` round-robin passes (so slow spells of a shared
    machine hit every job alike)."""
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(rounds):
        for key, (model, steps) in jobs.items():
            best[key] = min(best[key], time_nll(model, x, steps))
    return best


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    torch.set_num_threads(args.threads)
    data = Parts(validate_config({})).dataset
    x = data.test_set(args.n, 12345)
    sa = build_model("SA")
    step_counts = [int(s) for s in args.sweep.split(",") if s.strip()]
    sweep_t = best_times({f"sa{s}": (sa, s) for s in step_counts}, x, args.repeats)
    sweep = [
        {"steps": s, "seconds": sweep_t[f"sa{s}"], "ms_per_point": 1e3 * sweep_t[f"sa{s}"] / args.n}
        for s in step_counts
    ]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    models = {m: build_model(m) for m in methods}
    times = best_times({m: (models[m], args.steps) for m in methods}, x, args.repeats)
    compare = [{"method": m, "blocks": models[m].num_blocks, "seconds": times[m]} for m in methods]
    sa_time = next((c["seconds"] for c in compare if c["method"] == "SA"), None)
    for c in compare:
        c["vs_SA"] = c["seconds"] / sa_time if sa_time else None
    t1 = markdown_table(
        ["RK4 steps", "seconds", "ms per point"],
        [[s["steps"], s["seconds"], s["ms_per_point"]] for s in sweep],
    )
    t2 = markdown_table(
        ["method", "blocks", "seconds", "time / SA"],
        [[c["method"], c["blocks"], c["seconds"], f"{c['vs_SA']:.2f}x"] for c in compare],
    )
    md = (
        f"## Likelihood evaluation time (`psm bench nll`)\n\n"
        f"Exact-trace NLL of {args.n} TY test points in one batch, paper MLP per block, "
        f"{args.threads} torch threads; each row the best of {args.repeats} round-robin passes "
        f"over all rows, measured side by side in one run.\n\n"
        f"SA-DPM against the RK4 step count:\n\n{t1}\n\n"
        f"Methods at RK4 with {args.steps} steps (DPSM: the paper's piecewise-constant "
        f"field):\n\n{t2}\n"
    )
    return {"n": args.n, "steps": args.steps, "sweep": sweep, "methods": compare}, md
