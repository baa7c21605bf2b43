"""Likelihood evaluation time: RK4 step counts, and SA vs TPSM vs DPSM at the same steps.

The time of an ODE likelihood does not depend on how well the nets are trained, so the models
here are freshly initialised paper MLPs (one per block) assembled exactly as a trained run
would be (:class:`psm.core.model.BlockModel`); every model scores the same TY test points with the
exact trace, side by side in one run.

``--trace-only`` measures just the exact trace's two paths side by side (issue 21): the paper
MLP's closed form (:meth:`psm.nets.mlp.PaperMLP.output_and_trace`) against autograd's D backward
passes (the same nets behind plain callables), alternating, with the median of the paired
ratios and the largest difference of the per-point results.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from ..core.likelihood import evaluate_nll, log_likelihood
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
    p.add_argument(
        "--trace-only", action="store_true",
        help="only compare the exact trace's closed form (paper MLP) with autograd",
    )  # fmt: skip
    p.add_argument("--trace-n", type=int, default=2000, help="points for --trace-only")
    p.add_argument("--trace-blocks", type=int, default=5, help="TPSM blocks for --trace-only")
    p.add_argument("--trace-steps", type=int, default=50, help="RK4 steps for --trace-only")


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


def autograd_model(model: BlockModel) -> BlockModel:
    """The same nets behind plain callables: no closed-form trace to find, so the exact trace
    goes through autograd (D backward passes per evaluation, psm before issue 21)."""
    blocks = [lambda x, t, net=net: net(x, t) for net in model.blocks]
    return BlockModel(model.process, model.partition, blocks, shape=model.shape)


def compare_trace(
    x: torch.Tensor, blocks: int, steps: int, repeats: int, seed: int = 0
) -> dict[str, Any]:
    """The exact-trace log-likelihood of ``x`` through a TPSM of untrained paper MLPs, by the
    nets' closed form (new) and by autograd (old), alternating ``repeats`` times in one
    process (old first on even rounds).

    Returns:
        Seconds of each run, the median of the paired old/new ratios, and the largest
        absolute and relative difference of the per-point log-likelihoods.
    """
    partition = {"kind": "equal", "blocks": blocks}
    parts = Parts(validate_config({"name": "trace", "partition": partition}))
    torch.manual_seed(seed)
    nets = [parts.new_net().eval().requires_grad_(False) for _ in range(blocks)]
    new = BlockModel(parts.process, parts.partition, nets, shape=parts.shape)
    models = {"new": new, "old": autograd_model(new)}
    solver = SolverSettings("rk4", steps)
    secs: dict[str, list[float]] = {"old": [], "new": []}
    values: dict[str, torch.Tensor] = {}
    for r in range(repeats):
        for key in ("old", "new") if r % 2 == 0 else ("new", "old"):
            start = time.perf_counter()
            values[key] = log_likelihood(models[key], x, solver=solver)
            secs[key].append(time.perf_counter() - start)
    diff = (values["new"] - values["old"]).abs()
    return {
        "n": x.shape[0], "blocks": blocks, "rk4_steps": steps, "repeats": repeats,
        "old_seconds": secs["old"], "new_seconds": secs["new"],
        "median_ratio": statistics.median(o / n for o, n in zip(secs["old"], secs["new"])),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / values["old"].abs().clamp_min(1e-12)).max()),
    }  # fmt: skip


def trace_section(res: dict[str, Any], threads: int) -> str:
    """Markdown of :func:`compare_trace`."""
    table = markdown_table(
        ["path", "seconds (each run)", "old / new (median of pairs)"],
        [
            ["autograd (old)", ", ".join(f"{s:.2f}" for s in res["old_seconds"]), ""],
            ["closed form (new)", ", ".join(f"{s:.2f}" for s in res["new_seconds"]),
             f"{res['median_ratio']:.2f}x"],
        ],
    )  # fmt: skip
    return (
        f"### Exact trace: the MLP's closed form against autograd\n\n"
        f"Exact-trace log-likelihood of {res['n']} TY test points, TPSM with "
        f"{res['blocks']} untrained paper MLPs, RK4 with {res['rk4_steps']} steps, {threads} "
        f"torch thread(s), {res['repeats']} alternating runs in one process.\n\n{table}\n\n"
        f"Largest difference of the per-point log-likelihoods: {res['max_abs_diff']:.2g} nats "
        f"({res['max_rel_diff']:.2g} relative).\n"
    )


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    torch.set_num_threads(args.threads)
    if args.trace_only:
        x = Parts(validate_config({})).dataset.test_set(args.trace_n, 12345)
        res = compare_trace(x, args.trace_blocks, args.trace_steps, args.repeats)
        return {"trace": res}, trace_section(res, args.threads)
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
