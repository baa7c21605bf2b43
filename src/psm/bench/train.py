"""Training throughput: the ensemble vs the one-block-at-a-time loop, paper MLP on TY.

For each K, a fresh run of K blocks is trained to the same step count twice, through the real
code paths: ``train_block`` block after block (the loop) and ``train_ensemble`` (all K stacked
in one process). Both include their disk writes (status every ``log_every`` steps and the final
checkpoint). Also measured: what drawing one batch costs next to one training step.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..training.train import StackTrainer, train_block, train_ensemble
from .report import markdown_table, toy_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", default="1,10,50,200", help="K values, comma-separated")
    p.add_argument(
        "--block-steps",
        type=int,
        default=8000,
        help="total block-steps per measurement (steps per block = this / K, at least 40)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--repeats", type=int, default=3, help="alternating loop/ensemble runs; the best counts"
    )
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--gpu-blocks", type=int, default=200, help="K measured on a GPU if present")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_loop(root: Path, k: int, steps: int, batch: int, device: str = "cpu") -> float:
    """Seconds to train K blocks one after another with ``train_block``."""
    run = toy_run(root, f"loop{k}", k, steps, batch, device=device)
    t = time.perf_counter()
    for b in range(k):
        train_block(run, b)
    _sync(device)
    return time.perf_counter() - t


def time_ensemble(root: Path, k: int, steps: int, batch: int, device: str = "cpu") -> float:
    """Seconds to train K blocks stacked with ``train_ensemble``."""
    run = toy_run(root, f"ens{k}-{device.replace(':', '')}", k, steps, batch, device=device)
    t = time.perf_counter()
    train_ensemble(run)
    _sync(device)
    return time.perf_counter() - t


def time_sampling(root: Path, batch: int, n: int = 300) -> dict[str, float]:
    """Microseconds per batch draw and per full training step of one block (draw included)."""
    run = toy_run(root, "sampling", 10, 10, batch)
    trainer = StackTrainer(run, [3])  # the training loop's own step, one block
    problem, gen = trainer.problems[0], trainer.generators[0]
    for _ in range(20):  # warm-up
        problem.draw_batch(gen)
        trainer.train_step()
    t = time.perf_counter()
    for _ in range(n):
        problem.draw_batch(gen)
    draw = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        trainer.train_step()
    step = (time.perf_counter() - t) / n
    return {"draw_us": draw * 1e6, "step_us": step * 1e6, "draw_share": draw / step}


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.blocks.split(",") if k.strip()]
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="psm-bench-") as tmp:
        root = Path(tmp)
        sampling = time_sampling(root, args.batch_size)
        for k in ks:
            steps = max(40, args.block_steps // k)
            pairs = []
            for _ in range(args.repeats):  # alternate, so both see the same machine
                pairs.append((time_loop(root, k, steps, args.batch_size),
                              time_ensemble(root, k, steps, args.batch_size)))  # fmt: skip
            t_loop = min(p[0] for p in pairs)
            t_ens = min(p[1] for p in pairs)
            paired = sorted(p[0] / p[1] for p in pairs)
            rec = {
                "K": k, "steps_per_block": steps, "device": "cpu",
                "loop_block_steps_per_s": k * steps / t_loop,
                "ensemble_block_steps_per_s": k * steps / t_ens,
            }  # fmt: skip
            rec["speedup"] = rec["ensemble_block_steps_per_s"] / rec["loop_block_steps_per_s"]
            rec["paired_speedups"] = paired
            rec["median_paired_speedup"] = paired[len(paired) // 2]
            results.append(rec)
            rows.append([k, "cpu", steps, rec["loop_block_steps_per_s"],
                         rec["ensemble_block_steps_per_s"], f"{rec['speedup']:.2f}x",
                         f"{rec['median_paired_speedup']:.2f}x"])  # fmt: skip
        if torch.cuda.is_available():
            k = args.gpu_blocks
            steps = max(40, args.block_steps // k)
            dev = "cuda"
            time_ensemble(root, k, 20, args.batch_size, dev)  # warm-up (kernels, allocator)
            t_loop = time_loop(root, min(k, 10), steps, args.batch_size, dev)
            t_ens = time_ensemble(root, k, steps, args.batch_size, dev)
            loop_rate = min(k, 10) * steps / t_loop
            rec = {
                "K": k, "steps_per_block": steps, "device": torch.cuda.get_device_name(0),
                "loop_block_steps_per_s": loop_rate, "loop_blocks_measured": min(k, 10),
                "ensemble_block_steps_per_s": k * steps / t_ens,
            }  # fmt: skip
            rec["speedup"] = rec["ensemble_block_steps_per_s"] / loop_rate
            results.append(rec)
            rows.append([k, rec["device"], steps, loop_rate, rec["ensemble_block_steps_per_s"],
                         f"{rec['speedup']:.2f}x", "-"])  # fmt: skip
    table = markdown_table(
        ["K", "device", "steps/block", "loop block-steps/s (best)",
         "ensemble block-steps/s (best)", "ensemble / loop (best)",
         "ensemble / loop (median of pairs)"],
        rows,
    )  # fmt: skip
    md = (
        f"## Training throughput (`psm bench train`)\n\n"
        f"Paper MLP on TY, batch {args.batch_size}, {args.threads} torch threads, fused Adam; "
        f"both columns measured side by side in one run through `train_block` (loop, one "
        f"block after another) and `train_ensemble` (all K stacked), disk writes included; "
        f"best of {args.repeats} alternating runs each.\n\n{table}\n\n"
        f"Drawing one batch of {args.batch_size}: {sampling['draw_us']:.0f} us; one full "
        f"training step of one block (draw included): {sampling['step_us']:.0f} us; drawing is "
        f"{100 * sampling['draw_share']:.1f}% of a step.\n"
    )
    return {"results": results, "sampling": sampling, "threads": args.threads}, md
