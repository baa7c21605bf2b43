"""Training throughput: the ensemble vs the one-block-at-a-time loop, paper MLP on TY.

For each K, a fresh run of K blocks is trained to the same step count twice, through the real
code paths: ``train_block`` block after block (the loop) and ``train_ensemble`` (all K stacked
in one process). Both include their disk writes (status every ``log_every`` steps and the final
checkpoint). Also measured: what drawing one batch costs next to one training step.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.objective import stack_batches
from ..training.train import StackTrainer, train_block, train_ensemble
from .report import markdown_table, positive_ints, toy_run


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


STEP_MFLOP_NOTE = "three matrix products per linear layer, 2 B fan_in fan_out FLOPs each"


def step_flops(trainer: StackTrainer) -> float:
    """FLOPs of one training step of a stack of MLPs: three matrix products per linear layer
    (forward, gradient in the input, gradient in the weights), ``2 B fan_in fan_out`` each,
    per block (about 94 MFLOP for the paper MLP at batch 512)."""
    batch = trainer.problems[0].batch_size
    linears = [m for m in trainer.stack.net_state(0) if m.endswith("weight")]
    per = sum(trainer.stack.part(trainer.stack.params[n], 0).numel() for n in linears)
    return 3.0 * 2.0 * batch * per * len(trainer.blocks)


def reference_step(tr: StackTrainer) -> Tensor:
    """The training step as it was before the direct fused-Adam call (``opt.zero_grad``,
    the autocast context entered every step, ``opt.step``): the same arithmetic as
    :meth:`StackTrainer.train_step` (bit-for-bit), kept to measure the two side by side."""
    batch = stack_batches([p.draw_batch(g) for p, g in zip(tr.problems, tr.generators)])
    with tr.recipe.autocast():
        out = tr.stack(batch.x_t, batch.t)
    losses = tr.objective.loss(out.float(), batch.target, batch.weight)
    tr.opt.zero_grad(set_to_none=True)
    losses.sum().backward()
    if tr.recipe.grad_clip is not None:
        tr.stack.clip_grad_norm_(tr.recipe.grad_clip)
    for group in tr.opt.param_groups:
        group["lr"] = tr.recipe.lr(tr.step)
    tr.opt.step()
    tr.step += 1
    return losses.detach()


def mm_rate(size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of ``torch.mm`` of two ``size x size`` float32 matrices (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def time_step_rate(root: Path, batch: int, rounds: int = 7, steps: int = 100) -> dict[str, Any]:
    """One block's training step (draw and Adam included, one thread, steady state) as a
    fraction of the one-core ``torch.mm`` rate, the reference step and the current one side by
    side: ``rounds`` alternating chunks of ``steps`` steps each, ``torch.mm`` measured between
    the chunks; medians of the per-round values."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = toy_run(root, "rate", 10, 10, batch)
        old, new = StackTrainer(run, [3]), StackTrainer(run, [3])
        for _ in range(20):  # warm-up (and Adam's state made)
            reference_step(old)
            new.train_step()
        flops = step_flops(new)
        fractions: dict[str, list[float]] = {"old": [], "new": []}
        us: dict[str, list[float]] = {"old": [], "new": []}
        ratios = []
        for _ in range(rounds):
            secs = {}
            for name, step in (("old", lambda: reference_step(old)), ("new", new.train_step)):
                t = time.perf_counter()
                for _ in range(steps):
                    step()
                secs[name] = (time.perf_counter() - t) / steps
            mm = mm_rate()
            for name, sec in secs.items():
                fractions[name].append(flops / sec / mm)
                us[name].append(sec * 1e6)
            ratios.append(secs["old"] / secs["new"])
    finally:
        torch.set_num_threads(threads)
    med = statistics.median
    return {
        "step_mflop": flops / 1e6,
        "old_us": med(us["old"]), "new_us": med(us["new"]),
        "old_fraction_of_mm": med(fractions["old"]), "new_fraction_of_mm": med(fractions["new"]),
        "paired_speedups": sorted(ratios), "median_paired_speedup": med(ratios),
    }  # fmt: skip


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    torch.set_num_threads(args.threads)
    ks = list(positive_ints(args.blocks, "--blocks"))
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="psm-bench-") as tmp:
        root = Path(tmp)
        sampling = time_sampling(root, args.batch_size)
        rate = time_step_rate(root, args.batch_size)
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
    rate_rows = [
        ["before (opt.zero_grad, opt.step)", rate["old_us"], rate["old_fraction_of_mm"]],
        ["now (direct fused Adam)", rate["new_us"], rate["new_fraction_of_mm"]],
    ]
    md += (
        f"\nOne block's step at batch {args.batch_size} ({rate['step_mflop']:.0f} MFLOP: "
        f"{STEP_MFLOP_NOTE}), one thread, steady state, as a fraction of one core's "
        f"`torch.mm` rate (2048 x 2048 float32) measured between the chunks, medians of 7 "
        f"alternating chunks of 100 steps:\n\n"
        + markdown_table(["step", "us / step", "fraction of the mm rate"], rate_rows)
        + f"\n\nnow / before, median of the paired chunks: {rate['median_paired_speedup']:.2f}x "
        "(bit-for-bit the same weights).\n"
    )
    return {"results": results, "sampling": sampling, "step_rate": rate,
            "threads": args.threads}, md  # fmt: skip
