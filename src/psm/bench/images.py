"""Images: U-Net training steps/s (one net in a loop vs K stacked) and bits/dim time on digits.

Training: for each digits-sized U-Net of ``configs/images/digits_*.yaml`` (the DDPM U-Net of
SA/TPSM, the classic U-Net of DPSM) and each K, throwaway runs on the bundled digits are
stepped through the real training step, :meth:`psm.training.train.StackTrainer.train_step` (draw,
forward, loss, backward, Adam; no disk writes): K single-block trainers one after another (the
loop, what the local executor does per worker) against one trainer of all K blocks stacked
(``torch.func`` over the stacked weights, what the ensemble executor does). Both are warmed up
first (the stacked forward's first call is slow), then timed alternately; the best of the
repeats counts and the ratio is quoted.

Likelihood: bits/dim of digits test images under untrained SA, TPSM (10 blocks) and DPSM (100
grid points) models built from the same configs, RK4, Hutchinson trace with one probe held
fixed per solve (psm's default for images), and the exact trace for scale (the reason
Hutchinson is the default above 16 dimensions); the time does not depend on the training.

On a GPU (CUDA available) it also times a CIFAR-10-sized U-Net (``ddpm_unet`` base 64, mults
1, 2, 4, 8, on random 3x32x32 images in a throwaway prepared directory): one block's fp32
step, K blocks in a loop vs stacked, and one step with EMA and bf16 autocast, with the device
name. Without a GPU the section says that those rows were not measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .report import markdown_table

DIGITS_NETS = {
    "ddpm_unet": {"name": "ddpm_unet", "base": 16, "mults": [1, 2], "res_blocks": 1,
                  "attention_levels": [1], "groups": 8, "dropout": 0.1},
    "classic_unet": {"name": "classic_unet", "base": 16, "depth": 3, "groups": 8},
}  # fmt: skip
"""The nets of configs/images/digits_{sa,tpsm*}.yaml and digits_dpsm.yaml."""
CIFAR_NET = {"name": "ddpm_unet", "base": 64, "mults": [1, 2, 4, 8]}  # the paper's, 63.5M params


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", default="4,10", help="K values stacked, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="timed steps per block per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="alternating loop/stack rounds")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--batch", type=int, default=64, help="DDPM U-Net batch (DPSM: 4x)")
    p.add_argument("--nll-n", type=int, default=32, help="test images per likelihood")
    p.add_argument("--nll-steps", type=int, default=100, help="RK4 steps per likelihood")
    p.add_argument("--exact-steps", type=int, default=2, help="RK4 steps of the exact row")
    p.add_argument("--gpu-batch", type=int, default=128, help="CIFAR-10 batch on a GPU")
    p.add_argument("--gpu-blocks", type=int, default=4, help="K stacked on a GPU")
    p.add_argument("--gpu-steps", type=int, default=20, help="timed steps on a GPU")


# ---------------------------------------------------------------------- throwaway runs
def image_run(root: Path, name: str, net: dict, partition: dict, batch: int, **train: Any):
    """A fresh run on the bundled digits (or ``train.data``) for timing."""
    from ..runs.config import validate_config
    from ..runs.run import Run

    data = train.pop("data", {"name": "digits"})
    raw = {
        "name": name,
        "data": data,
        "partition": {**partition, "t0": 1e-3},
        "net": net,
        "train": {"steps": 10**6, "batch_size": batch, "log_every": 10**6,
                  "checkpoint_every": 10**6, **train},
    }  # fmt: skip
    path, n = root / name, 0
    while path.exists():
        n += 1
        path = root / f"{name}-{n}"
    return Run.create(validate_config(raw), path)


def synthetic_prepared(root: Path, name: str, shape: tuple[int, ...], n: int = 1024) -> Path:
    """A prepared directory of random uint8 images (speed does not depend on the content)."""
    from ..data.prepare import FORMAT, MEAN_FILE, META_FILE, TEST_FILE, TRAIN_FILE

    out = root / f"data-{name}"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    test = rng.integers(0, 256, (16, *shape), dtype=np.uint8)
    np.save(out / TRAIN_FILE, train)
    np.save(out / TEST_FILE, test)
    np.save(out / MEAN_FILE, train.mean(0, dtype=np.float64))
    meta = {"format": FORMAT, "name": name, "shape": list(shape), "dtype": "uint8",
            "levels": 256, "n_train": n, "n_test": 16, "split": {"kind": "synthetic"}}  # fmt: skip
    (out / META_FILE).write_text(json.dumps(meta))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer, steps: int) -> float:
    """Seconds for ``steps`` calls of the real training step."""
    _sync(trainer.device)
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    _sync(trainer.device)
    return time.perf_counter() - t


def loop_vs_stack(run, k: int, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Block-steps/s of K single-block trainers in turn vs one trainer of K stacked blocks."""
    from ..training.train import StackTrainer

    singles = [StackTrainer(run, [b]) for b in range(k)]
    stack = StackTrainer(run, list(range(k)))
    for tr in [*singles, stack]:
        for _ in range(warmup):
            tr.train_step()
    pairs = []
    for _ in range(repeats):  # alternate, so both see the same machine
        t_loop = sum(time_steps(tr, steps) for tr in singles)
        t_stack = time_steps(stack, steps)
        pairs.append((t_loop, t_stack))
    loop = k * steps / min(p[0] for p in pairs)
    stacked = k * steps / min(p[1] for p in pairs)
    paired = sorted(p[0] / p[1] for p in pairs)
    params = sum(p.numel() for p in singles[0].stack.params.values())
    return {
        "K": k, "steps": steps, "params_per_net": params,
        "loop_block_steps_per_s": loop, "stacked_block_steps_per_s": stacked,
        "speedup": stacked / loop, "median_paired_speedup": paired[len(paired) // 2],
    }  # fmt: skip


# ---------------------------------------------------------------------- likelihood
def nll_models(root: Path) -> dict[str, Any]:
    """Untrained SA, TPSM (10) and DPSM (100 points) models with the digits configs' nets."""
    from ..core.model import BlockModel
    from ..runs.run import Run

    specs = {
        "SA": ("ddpm_unet", {"kind": "equal", "blocks": 1}),
        "TPSM-10": ("ddpm_unet", {"kind": "equal", "blocks": 10}),
        "DPSM-100": ("classic_unet", {"kind": "grid", "points": 100}),
    }
    models = {}
    for name, (net, part) in specs.items():
        run: Run = image_run(root, f"nll-{name}", DIGITS_NETS[net], part, 64)
        torch.manual_seed(0)
        nets = [run.parts.new_net().eval().requires_grad_(False) for _ in range(run.num_blocks)]
        models[name] = BlockModel(run.process, run.partition, nets, shape=run.shape)
    return models


def time_bits(model, dataset, n: int, steps: int, trace: str) -> dict[str, Any]:
    """One bits/dim evaluation of the first n digits test images; ``steps`` is a budget split
    by block length, at least one per block."""
    from ..core.ode import SolverSettings, solve_units
    from ..runs.inference import EvalSettings, evaluate_model

    solver = SolverSettings("rk4", steps)
    settings = EvalSettings("psm", solver, trace, 1, "solve", 1e-3, True)
    ev = evaluate_model(
        model, dataset, n=n, test_seed=12345, settings=settings, batch_size=n, progress=False
    )
    evals = 4 * solve_units(model.segments(), solver)
    return {
        "n": n, "rk4_steps": evals // 4, "evaluations": evals, "trace": trace,
        "seconds": ev.result.seconds, "ms_per_evaluation": 1e3 * ev.result.seconds / evals,
        "us_per_evaluation_and_image": 1e6 * ev.result.seconds / evals / n,
        "bpd_untrained": ev.bits.bpd,
    }  # fmt: skip


def best_bits(jobs: dict[str, tuple], dataset, rounds: int) -> dict[str, dict[str, Any]]:
    """The fastest of ``rounds`` round-robin passes over the jobs (so slow spells of a shared
    machine hit every job alike), after a one-image, one-step warm-up of each."""
    for model, _, _, trace in jobs.values():
        time_bits(model, dataset, 1, 1, trace)
    best: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for key, (model, n, steps, trace) in jobs.items():
            rec = time_bits(model, dataset, n, steps, trace)
            if key not in best or rec["seconds"] < best[key]["seconds"]:
                best[key] = rec
    return best


# ---------------------------------------------------------------------- GPU
def gpu_rows(root: Path, device: str, args: argparse.Namespace, net: dict = CIFAR_NET) -> dict:
    """CIFAR-10-sized U-Net steps on ``device``: fp32 one block, K loop vs stacked, EMA + bf16."""
    from ..training.train import StackTrainer

    data = {"name": "cifar10", "path": str(synthetic_prepared(root, "cifar10", (3, 32, 32)))}
    common = {"data": data, "device": device}
    part = {"kind": "equal", "blocks": args.gpu_blocks}
    out: dict[str, Any] = {"device": device, "batch": args.gpu_batch}
    if device.startswith("cuda"):
        out["device_name"] = torch.cuda.get_device_name(torch.device(device))
    run = image_run(root, "gpu-fp32", net, part, args.gpu_batch, **common)
    out["stack"] = loop_vs_stack(run, args.gpu_blocks, args.gpu_steps, args.warmup, 1)
    recipe = image_run(
        root, "gpu-ema-bf16", net, part, args.gpu_batch, ema=0.9999, precision="bf16", **common
    )
    rates = {}
    for key, r in (("fp32", run), ("ema_bf16", recipe)):
        tr = StackTrainer(r, [0])
        for _ in range(args.warmup):
            tr.train_step()
        rates[key] = args.gpu_steps / time_steps(tr, args.gpu_steps)
    out["steps_per_s"] = rates
    out["ema_bf16_vs_fp32"] = rates["ema_bf16"] / rates["fp32"]
    if device.startswith("cuda"):
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return out


# ---------------------------------------------------------------------- the benchmark
def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.blocks.split(",") if k.strip()]
    train_rows, nll_rows = [], []
    results: dict[str, Any] = {"threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="psm-bench-images-") as tmp:
        root = Path(tmp)
        for net_name, net in DIGITS_NETS.items():
            batch = args.batch * (4 if net_name == "classic_unet" else 1)
            for k in ks:
                part = (
                    {"kind": "grid", "points": k}
                    if net_name == "classic_unet"
                    else {"kind": "equal", "blocks": k}
                )
                r = image_run(root, f"{net_name}-{k}", net, part, batch, threads=args.threads)
                rec = loop_vs_stack(r, k, args.steps, args.warmup, args.repeats)
                rec |= {"net": net_name, "batch": batch}
                train_rows.append(rec)
        results["train"] = train_rows

        models = nll_models(root)
        from ..data.images import ImageDataset

        digits = ImageDataset.digits(scale=2.0)
        jobs = {name: (m, args.nll_n, args.nll_steps, "hutchinson") for name, m in models.items()}
        jobs["SA exact"] = (models["SA"], args.nll_n, args.exact_steps, "exact")
        for key, rec in best_bits(jobs, digits, args.repeats).items():
            model = jobs[key][0]
            nll_rows.append({"model": key.split()[0], "blocks": model.num_blocks, **rec})
        results["bits_per_dim"] = nll_rows
        gpu = None
        if torch.cuda.is_available():
            gpu = gpu_rows(root, "cuda", args)
        results["gpu"] = gpu
    return results, markdown(results, args)


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The docs/benchmarks.md section."""
    t1 = markdown_table(
        ["net (digits config)", "params", "batch", "K", "loop block-steps/s (best)",
         "stacked block-steps/s (best)", "stacked / loop (best)",
         "stacked / loop (median of pairs)"],
        [[r["net"], f"{r['params_per_net']:,}", r["batch"], r["K"], r["loop_block_steps_per_s"],
          r["stacked_block_steps_per_s"], f"{r['speedup']:.2f}x",
          f"{r['median_paired_speedup']:.2f}x"] for r in results["train"]],
    )  # fmt: skip
    rows = results["bits_per_dim"]
    hutch = {r["model"]: r for r in rows if r["trace"] == "hutchinson"}
    t2 = markdown_table(
        ["model", "blocks", "trace", "images", "RK4 steps", "seconds", "ms per evaluation",
         "us per evaluation and image"],
        [[r["model"], r["blocks"], r["trace"], r["n"], r["rk4_steps"], r["seconds"],
          r["ms_per_evaluation"], r["us_per_evaluation_and_image"]] for r in rows],
    )  # fmt: skip
    exact = next(r for r in rows if r["trace"] == "exact")
    factor = exact["us_per_evaluation_and_image"] / hutch["SA"]["us_per_evaluation_and_image"]
    full = 4000 * hutch["SA"]["us_per_evaluation_and_image"] / 1e6
    gpu = results["gpu"]
    if gpu is None:
        gpu_md = (
            "**GPU rows: not measured.** No GPU was lent to this task (`torch.cuda.is_available()` "
            "was false), so the CIFAR-10-sized U-Net step (`ddpm_unet` base 64, mults 1, 2, 4, "
            f"8, batch {args.gpu_batch}), the stacked ensemble of {args.gpu_blocks} of them and "
            "the EMA + bf16 step are still to be taken: `psm bench images` measures them, with "
            "the device name, wherever CUDA is available."
        )
    else:
        s = gpu["stack"]
        gpu_md = markdown_table(
            ["device", "measurement", "figure"],
            [[gpu.get("device_name", gpu["device"]), "fp32 step, one block (steps/s)",
              gpu["steps_per_s"]["fp32"]],
             [gpu.get("device_name", gpu["device"]), "EMA + bf16 step, one block (steps/s)",
              gpu["steps_per_s"]["ema_bf16"]],
             [gpu.get("device_name", gpu["device"]), "EMA + bf16 / fp32",
              f"{gpu['ema_bf16_vs_fp32']:.2f}x"],
             [gpu.get("device_name", gpu["device"]),
              f"K = {s['K']} loop / stacked (block-steps/s)",
              f"{s['loop_block_steps_per_s']:.3g} / {s['stacked_block_steps_per_s']:.3g} "
              f"({s['speedup']:.2f}x)"]],
        )  # fmt: skip
        gpu_md = f"CIFAR-10-sized U-Net (63,482,755 parameters), batch {gpu['batch']}:\n\n{gpu_md}"
    return (
        f"## Images (`psm bench images`)\n\n"
        f"Training throughput of the digits configs' U-Nets on the bundled digits (1x8x8), "
        f"through the real training step (`StackTrainer.train_step`: draw, forward, loss, "
        f"backward, Adam; no disk writes), {args.threads} torch threads on the CPU: K single-"
        f"block trainers one after another (the loop) against one trainer of the K blocks "
        f"stacked (the ensemble), {args.steps} timed steps per block after {args.warmup} "
        f"warm-up steps, best of {args.repeats} alternating rounds.\n\n{t1}\n\n"
        f"Bits/dim evaluation time on digits (untrained nets of the same configs; the time does "
        f"not depend on training), one batch, RK4, {args.threads} threads, best of "
        f"{args.repeats} round-robin passes over the rows:\n\n{t2}\n\n"
        f"The exact trace costs {factor:.0f}x Hutchinson's time per evaluation and image (64 "
        f"backward passes instead of one), which is why `psm nll` switches "
        f"to Hutchinson above 16 dimensions. At the paper's 1000 RK4 steps (4000 evaluations) "
        f"an SA bits/dim of digits costs about {full:.2f} s per image with Hutchinson, "
        f"{full * 359 / 60:.0f} min for the 359 test images.\n\n"
        f"{gpu_md}\n"
    )
