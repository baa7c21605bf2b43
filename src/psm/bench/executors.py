"""Executors side by side: one 8-block TY run with local (2 workers), ensemble and ray.

Every engine trains a fresh copy of the same run (paper MLP on TY, equal blocks) on the same
number of CPUs, through :meth:`Executor.run` as ``psm train`` calls it, so the wall time
includes what a user waits for: starting worker processes (and Ray), importing torch in them,
scheduling, and the disk writes. The reference is the serial loop: ``train_block`` on a few
blocks in this process with one thread, which gives the pure training seconds of one block.

Engine overhead per block is ``(wall x CPUs - K x serial block time) / K``: the CPU-seconds an
engine spends per block beyond the serial loop's work. It is negative where an engine is
faster than the loop (the ensemble stacks blocks into bigger, more efficient kernels).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import PSMError
from ..executors.base import Executor
from ..executors.ensemble import EnsembleExecutor
from ..executors.local import LocalExecutor
from ..training.train import train_block
from .report import markdown_table, toy_run

ENGINES = ("local", "ensemble", "ray", "ray-warm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", type=int, default=8, help="K, blocks of the run")
    p.add_argument("--steps", type=int, default=2000, help="training steps per block")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--cpus", type=int, default=2, help="CPUs every engine gets")
    p.add_argument(
        "--engines",
        default="local,ensemble,ray,ray-warm",
        help="comma-separated, from: " + ", ".join(ENGINES) + " (ray-warm: Ray started "
        "before the clock starts)",
    )
    p.add_argument("--serial-blocks", type=int, default=2, help="blocks timed in the serial loop")


def serial_block_seconds(root: Path, k: int, steps: int, batch: int, n: int) -> float:
    """Mean seconds to train one block with ``train_block`` in this process, one thread."""
    torch.set_num_threads(1)
    warm = toy_run(root, "warm-up", k, 20, batch, threads=1)
    train_block(warm, 0)  # first-call costs are not the loop's
    run = toy_run(root, "serial", k, steps, batch, threads=1)
    ids = [round(i * (k - 1) / max(1, n - 1)) for i in range(n)] if n > 1 else [0]
    t = time.perf_counter()
    for b in ids:
        train_block(run, b)
    return (time.perf_counter() - t) / len(ids)


def _executor(engine: str, cpus: int) -> Executor:
    if engine == "local":
        return LocalExecutor(workers=cpus, threads=1)
    if engine == "ensemble":
        return EnsembleExecutor(workers=1, threads=cpus)
    from ..executors.ray import RayExecutor

    return RayExecutor(local_cpus=cpus, num_cpus=1, threads=1)


def time_engine(root: Path, engine: str, args: argparse.Namespace) -> dict[str, Any]:
    """Wall seconds of ``Executor.run`` on a fresh run (``ray-warm``: Ray started beforehand)."""
    run = toy_run(root, engine, args.blocks, args.steps, args.batch_size, threads=1)
    ex = _executor(engine, args.cpus)
    rec: dict[str, Any] = {"engine": engine, "describe": ex.describe()}
    ray = None
    if engine == "ray-warm":
        from ..executors.ray import import_ray

        ray = import_ray()
        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False)
        rec["ray_init_s"] = time.perf_counter() - t
    threads = torch.get_num_threads()
    try:
        t = time.perf_counter()
        outs = ex.run(run, list(range(args.blocks)))
        rec["wall_s"] = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
        if ray is not None:
            ray.shutdown()
    bad = [o for o in outs if o.state != "done"]
    if bad:
        raise PSMError(f"bench executors: {engine}: block {bad[0].block} {bad[0].state}")
    rec["train_loop_s"] = [run.ledger.status(b).wall_time for b in range(args.blocks)]
    return rec


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise PSMError(f"--engines: unknown {', '.join(unknown)} (from {', '.join(ENGINES)})")
    k, steps, cpus = args.blocks, args.steps, args.cpus
    results, rows = [], []
    with tempfile.TemporaryDirectory(prefix="psm-bench-") as tmp:
        root = Path(tmp)
        t_block = serial_block_seconds(root, k, steps, args.batch_size, args.serial_blocks)
        serial_rate = steps / t_block
        rows.append(["serial loop (reference)", "1 x 1", k * t_block, serial_rate, "1.00x", 0.0])
        for engine in engines:
            rec = time_engine(root, engine, args)
            wall = rec["wall_s"]
            rec["block_steps_per_s"] = k * steps / wall
            rec["speedup_vs_serial"] = rec["block_steps_per_s"] / serial_rate
            rec["overhead_cpu_s_per_block"] = (wall * cpus - k * t_block) / k
            results.append(rec)
            layout = f"1 x {cpus}" if engine == "ensemble" else f"{cpus} x 1"
            name = engine
            if "ray_init_s" in rec:
                name += f" (Ray start {rec['ray_init_s']:.1f} s not counted)"
            speedup = f"{rec['speedup_vs_serial']:.2f}x"
            rows.append(
                [name, layout, wall, rec["block_steps_per_s"], speedup,
                 rec["overhead_cpu_s_per_block"]]
            )  # fmt: skip
    table = markdown_table(
        ["engine", "processes x threads", "wall s", "block-steps/s", "vs serial",
         "overhead CPU-s / block"],
        rows,
    )  # fmt: skip
    md = (
        f"## Executors side by side (`psm bench executors`)\n\n"
        f"The same run, {k} blocks of the paper MLP on TY, {steps} steps per block, batch "
        f"{args.batch_size}, trained by each engine on {cpus} CPUs through `Executor.run` "
        f"(worker start-up, torch imports, scheduling and disk writes included). The serial "
        f"loop is `train_block` in one process with one thread ({t_block:.2f} s per block, "
        f"timed on {args.serial_blocks} block(s) and scaled to {k}). Overhead per block is "
        f"`(wall x CPUs - K x serial block time) / K`; negative means faster than the "
        f"serial loop's work.\n\n{table}\n"
    )
    result = {
        "blocks": k, "steps": steps, "batch_size": args.batch_size, "cpus": cpus,
        "serial_block_s": t_block, "results": results,
    }  # fmt: skip
    return result, md
