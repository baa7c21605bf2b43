"""Big stacks: block-steps/s of a big stack of the paper MLP against a small one, stacked whole
(before) and in stacks of at most ``CPU_STACK`` (now), one thread; start-up apart.

The steady state goes through the training loop's own step (``StackTrainer.train_step``: draw,
forward, loss, backward, Adam; no disk writes). "Whole" is one trainer of all K blocks; "now"
is what ``train_ensemble`` does by default on a CPU: consecutive stacks of at most
``CPU_STACK`` blocks, each trained for its steps in turn. Both variants alternate in every
round, so each ratio is taken on the same machine state. The start-up (building the trainers:
K nets, their generators and Adam) and the final checkpoint (2 files per block, fsynced) are
timed once per variant, beside the steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import PSMError
from ..training.train import CPU_STACK, StackTrainer, stack_chunks
from .report import markdown_table, positive_ints, toy_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", default="10,200", help="K values, comma-separated")
    p.add_argument("--stack", type=int, default=CPU_STACK, help="most blocks per stack for 'now'")
    p.add_argument(
        "--block-steps", type=int, default=2000, help="block-steps per variant per round"
    )
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians count)")
    p.add_argument("--batch-size", type=int, default=512)


def _build(run, chunks: list[list[int]]) -> tuple[list[StackTrainer], float]:
    t = time.perf_counter()
    trainers = [StackTrainer(run, c) for c in chunks]
    return trainers, time.perf_counter() - t


def _steps(trainers: list[StackTrainer], steps: int) -> float:
    """Seconds for ``steps`` steps of every trainer, one trainer after another."""
    t = time.perf_counter()
    for tr in trainers:
        for _ in range(steps):
            tr.train_step()
    return time.perf_counter() - t


def _write(trainers: list[StackTrainer]) -> float:
    t = time.perf_counter()
    for tr in trainers:
        tr.checkpoint(final=True)
    return time.perf_counter() - t


def measure(root: Path, k: int, stack: int, block_steps: int, rounds: int, batch: int):
    """One K: block-steps/s of the whole stack and of stacks of ``stack``, paired per round,
    with the start-up and final-write seconds of each."""
    steps = max(2, block_steps // k)
    out: dict[str, Any] = {"K": k, "steps_per_round": steps, "stack": stack}
    variants = {"whole": [list(range(k))], "now": stack_chunks(list(range(k)), stack)}
    trainers = {}
    for name, chunks in variants.items():
        run = toy_run(root, f"{name}{k}", k, 10**6, batch)
        trainers[name], out[f"{name}_build_s"] = _build(run, chunks)
        _steps(trainers[name], 2)  # warm-up: Adam's state made, kernels chosen
    out["now_stacks"] = len(variants["now"])
    rates: dict[str, list[float]] = {"whole": [], "now": []}
    for i in range(rounds):  # the order flips every round: neither variant always goes first
        for name in ("whole", "now") if i % 2 == 0 else ("now", "whole"):
            rates[name].append(k * steps / _steps(trainers[name], steps))
    ratios = sorted(n / w for n, w in zip(rates["now"], rates["whole"]))
    for name in ("whole", "now"):
        out[f"{name}_block_steps_per_s"] = statistics.median(rates[name])
        out[f"{name}_write_s"] = _write(trainers[name])
    out["paired_now_over_whole"] = ratios
    out["median_now_over_whole"] = statistics.median(ratios)
    return out


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    ks = positive_ints(args.blocks, "--blocks")
    if args.stack < 1 or args.rounds < 1 or args.block_steps < 1:
        raise PSMError("--stack, --rounds and --block-steps must be positive")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="psm-bench-") as tmp:
            _build(toy_run(Path(tmp), "warm-up", 1, 10, args.batch_size), [[0]])  # lazy imports
            results = [
                measure(Path(tmp), k, args.stack, args.block_steps, args.rounds, args.batch_size)
                for k in ks
            ]
    finally:
        torch.set_num_threads(threads)
    small = results[0]
    rows = [
        [r["K"], r["now_stacks"], r["whole_block_steps_per_s"], r["now_block_steps_per_s"],
         f"{r['median_now_over_whole']:.2f}x",
         f"{r['now_block_steps_per_s'] / small['now_block_steps_per_s']:.2f}",
         f"{r['whole_block_steps_per_s'] / small['whole_block_steps_per_s']:.2f}",
         f"{r['whole_build_s']:.2f} / {r['now_build_s']:.2f}",
         f"{r['whole_write_s']:.2f} / {r['now_write_s']:.2f}"]
        for r in results
    ]  # fmt: skip
    table = markdown_table(
        ["K", "stacks (now)", "whole: block-steps/s", "now: block-steps/s",
         "now / whole (median of pairs)", f"now vs K={small['K']} now",
         f"whole vs K={small['K']} whole", "start-up s (whole / now)",
         "final write s (whole / now)"],
        rows,
    )  # fmt: skip
    md = (
        f"## Big stacks (`psm bench stacks`)\n\n"
        f"Paper MLP on TY, batch {args.batch_size}, one thread, the training loop's own step "
        f"(draw, forward, backward, Adam; no disk writes): K blocks stacked whole (before) "
        f"against consecutive stacks of at most {args.stack} (now, the CPU default), "
        f"{args.block_steps} block-steps per variant per round, {args.rounds} alternating "
        f"rounds (the order flipped every round), medians. Start-up (building the trainers) "
        f"and the final checkpoint (2 files per block) timed once each.\n\n{table}\n"
    )
    return {"results": results, "threads": 1}, md
