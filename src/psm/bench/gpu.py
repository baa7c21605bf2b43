"""GPU check: the paper's settings timed on one CUDA device (speed and peak memory).

``psm bench gpu`` (or ``scripts/gpu_check.sh``, which installs psm first) measures, through the
real code paths and on throwaway runs in a temporary directory:

* the paper MLP on TY (batch 512, Adam): one block against stacks of 10 and 200 blocks
  (:class:`~psm.training.train.StackTrainer`, block-steps/s);
* the CIFAR-10-sized ``ddpm_unet`` of ``configs/images/cifar10_sa.yaml`` (63.5M parameters,
  batch 128, random 3x32x32 images): one training step in float32, under bf16 autocast, bf16
  with the EMA of the weights, and bf16 with ``torch.compile`` (``train.compile``); plus the
  EMA update alone (``torch._foreach_lerp_`` over the 63.5M weights), so its cost per step is
  read two ways;
* 4 digits-sized U-Nets (``configs/images/digits_sa.yaml``) stacked in one trainer against a
  loop over 4 single-block trainers (block-steps/s);
* Hutchinson bits/dim (:func:`psm.core.likelihood.log_likelihood`, one probe held fixed, RK4)
  and probability-flow ODE sampling (:func:`psm.core.sample.sample_ode`, RK4) with an untrained
  digits U-Net (the time does not depend on the weights), as seconds per image at the paper's
  RK4-1000 (extrapolated from the steps done when the time cap cuts the solve).

Every measurement runs its warm-up steps (the first one timed apart: cuDNN's choices,
compilation), then timed chunks of steps with CUDA synchronized before and after each chunk,
until its time cap; the figure is the median time per step over the chunks. Peak memory is
``torch.cuda.max_memory_allocated``, reset before each measurement (building its nets
included). A whole-check budget stops starting new measurements once spent (they are marked
skipped), and a measurement that fails (out of memory, a compiler missing) is recorded with its
error while the others go on (the command then exits with code 1). The JSON is rewritten after
every measurement, so a check killed part-way leaves what it had.

Without CUDA the command says so in one line and exits with code 2; ``--cpu`` runs everything
on the CPU instead and ``--quick`` shrinks every size, which together test the code path in
seconds. The markdown table goes to ``--append FILE`` (appended under a heading naming the
device, date and torch version; nothing in the file is replaced), never anywhere by default.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import PSMError
from ..runs.atomic import atomic_write_text
from .images import image_run, synthetic_prepared
from .report import machine_info, markdown_table, positive_ints, toy_run

CIFAR_NET: dict[str, Any] = {
    "name": "ddpm_unet", "base": 64, "mults": [1, 2, 4, 8], "res_blocks": 2, "dropout": 0.1,
    "groups": 32, "activation": "elu", "time_input": "t",
}  # fmt: skip
"""The net of configs/images/cifar10_sa.yaml (63,482,755 parameters on 3 channels)."""
DIGITS_NET: dict[str, Any] = {
    "name": "ddpm_unet", "base": 16, "mults": [1, 2], "res_blocks": 1, "attention_levels": [1],
    "dropout": 0.1, "groups": 8, "activation": "elu", "time_input": "t",
}  # fmt: skip
"""The net of configs/images/digits_sa.yaml (176,849 parameters)."""
TINY_NET: dict[str, Any] = {
    "name": "ddpm_unet", "base": 8, "mults": [1, 2], "res_blocks": 1, "attention_levels": [1],
    "dropout": 0.1, "groups": 4,
}  # fmt: skip
"""``--quick``: a U-Net small enough for a CPU test."""
DIGITS_DATA = {"name": "digits", "center": True, "scale": 2.0, "dequantize": True}
PAPER_RK4_STEPS = 1000
EMA_DECAY = 0.9999  # configs/images/cifar10_sa.yaml
ODE_CAP_FACTOR = 3.0
"""The likelihood and sampling solves get this many caps (a whole RK4-1000 solve, if it fits)."""
COMPILE_MIN_SECONDS = 120.0
"""Least budget left to start the compiled step on a GPU (its compilation cannot be cut)."""


@dataclass(frozen=True)
class Sizes:
    """What the check runs: model sizes, batches, and its time limits."""

    mlp_blocks: tuple[int, ...] = (1, 10, 200)
    mlp_batch: int = 512
    cifar_net: dict[str, Any] = field(default_factory=lambda: dict(CIFAR_NET))
    cifar_shape: tuple[int, int, int] = (3, 32, 32)
    cifar_batch: int = 128
    digits_net: dict[str, Any] = field(default_factory=lambda: dict(DIGITS_NET))
    digits_batch: int = 64
    digits_stack: int = 4
    images: int = 256  # test images per likelihood solve, samples per ODE solve
    ode_steps: int = PAPER_RK4_STEPS  # RK4 steps aimed at (cut by the cap, extrapolated)
    warmup: int = 5  # untimed steps, the first timed apart
    cap: float = 10.0  # seconds of timed steps per measurement
    budget: float = 390.0  # seconds for the whole check; later measurements are skipped


FULL = Sizes()
QUICK = Sizes(
    mlp_blocks=(1, 4), mlp_batch=64, cifar_net=dict(TINY_NET), cifar_shape=(3, 8, 8),
    cifar_batch=4, digits_net=dict(TINY_NET), digits_batch=8, images=2, ode_steps=2, warmup=1,
    cap=0.05, budget=120.0,
)  # fmt: skip


# ---------------------------------------------------------------------- the command line
def add_parser(names: argparse._SubParsersAction) -> None:
    """Register ``psm bench gpu`` (its own flags: it appends, never replaces, a doc section)."""
    p = names.add_parser("gpu", help=(__doc__ or "").strip().splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=command)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu", action="store_true", help="run on the CPU (tests the code path)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test in seconds)")
    p.add_argument(
        "--json", dest="json_out", default=None,
        help="where to write the JSON (default bench-out/gpu-DATE-TIME.json)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument(
        "--append", default=None, metavar="FILE",
        help="append the markdown table to FILE (e.g. docs/benchmarks.md); nothing is replaced",
    )  # fmt: skip
    p.add_argument("--cap", type=float, default=None, help="seconds of timed steps each")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole check")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing")
    p.add_argument("--mlp-blocks", default=None, help="stack sizes K of the paper MLP (1,10,200)")
    p.add_argument(
        "--compile-backend", default=None,
        help="torch.compile backend (default inductor; eager with --cpu --quick)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def sizes_from(args: argparse.Namespace) -> Sizes:
    """The sizes of ``--quick`` or the full check, with the flags' overrides."""
    s = QUICK if args.quick else FULL
    over: dict[str, Any] = {}
    if args.cap is not None:
        over["cap"] = args.cap
    if args.budget is not None:
        over["budget"] = args.budget
    if args.warmup is not None:
        over["warmup"] = args.warmup
    if args.mlp_blocks is not None:
        over["mlp_blocks"] = positive_ints(args.mlp_blocks, "--mlp-blocks")
    s = replace(s, **over)
    if s.cap <= 0 or s.budget <= 0 or s.warmup < 1:
        raise PSMError("--cap and --budget must be positive and --warmup at least 1")
    if args.threads is not None and args.threads < 1:
        raise PSMError(f"--threads must be at least 1, got {args.threads}")
    return s


def command(args: argparse.Namespace) -> int:
    """``psm bench gpu``: check the device and the output paths, measure, write.

    Returns:
        0, or 1 when a row failed (its error is in the JSON and the table; the others ran).
    """
    if not args.cpu and not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        raise PSMError(
            f"no CUDA device is present (torch {torch.__version__}, built with {built}); "
            "nothing was measured. 'psm bench gpu --cpu --quick' tests the code path on the CPU"
        )
    sizes = sizes_from(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json_out or f"bench-out/gpu-{stamp}.json")
    if json_path.exists() and not args.force:
        raise PSMError(f"{json_path} exists: choose another --json or pass --force")
    append = Path(args.append) if args.append else None
    if append is not None and not append.parent.is_dir():
        raise PSMError(f"--append {append}: folder {append.parent} does not exist")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu" if args.cpu else "cuda")
    json_path.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict[str, Any]) -> None:
        atomic_write_text(json_path, _dumps(result))

    result = run_check(device, sizes, args, on_row=save)
    save(result)
    md = markdown(result)
    print(md)
    if append is not None:
        append_section(append, md)
    where = f" and appended to {append}" if append is not None else ""
    print(f"wrote {json_path}{where}", file=sys.stderr)
    failed = [k for k, r in result["rows"].items() if "error" in r]
    if failed:
        print(f"psm bench gpu: {len(failed)} row(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------- timing and memory
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], Any], device: torch.device, *, cap: float, warmup: int,
    max_steps: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Steady-state time of ``step``: ``warmup`` untimed calls (the first timed apart), then
    chunks of calls, each between two synchronizations, until ``cap`` seconds of chunks (at
    least one chunk) or ``max_steps`` timed calls.

    Returns:
        ``first_step_s``, ``warmup_steps``, ``timed_steps``, ``timed_s``, ``chunks`` and
        ``ms_per_step``: the median over chunks of a chunk's time per call.
    """
    sync(device)
    t = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        step()
    sync(device)
    per_step: list[float] = []
    done, spent, chunk = 0, 0.0, 1
    while not per_step or (spent < cap and (max_steps is None or done < max_steps)):
        n = chunk if max_steps is None else max(1, min(chunk, max_steps - done))
        t = time.perf_counter()
        for _ in range(n):
            step()
        sync(device)
        dt = time.perf_counter() - t
        per_step.append(dt / n)
        done, spent = done + n, spent + dt
        chunk = max(1, int(cap / 10 / max(dt / n, 1e-9)))  # about ten chunks in the cap
    return {
        "first_step_s": first, "warmup_steps": warmup, "timed_steps": done, "timed_s": spent,
        "chunks": len(per_step), "ms_per_step": 1e3 * statistics.median(per_step),
    }  # fmt: skip


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """``{"peak_mb": ...}`` filled on exit with the most memory allocated on ``device`` in the
    block (MiB; None on the CPU), counted from a reset at its start."""
    box: dict[str, float | None] = {"peak_mb": None}
    if device.type == "cuda":
        gc.collect()  # the last measurement's nets (trainers hold reference cycles)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield box
    finally:
        if device.type == "cuda":
            sync(device)
            box["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


class _TimeUp(Exception):
    """Raised from a solver's step hook when a measurement's cap is spent."""


def time_solve(
    solve: Callable[[Callable[..., None]], Any], device: torch.device, *, steps: int, cap: float
) -> dict[str, Any]:
    """Time ``solve(on_step)``, a fixed-step ODE solve of ``steps`` steps that calls
    ``on_step`` after each, cut at the first step past ``cap`` seconds.

    Returns:
        ``steps_done``, ``complete``, ``seconds``, ``ms_per_step`` and ``value`` (what
        ``solve`` returned; None when cut).
    """
    count = [0]

    def on_step(*_: Any) -> None:
        count[0] += 1
        if count[0] < steps and time.perf_counter() - t0 > cap:
            raise _TimeUp

    sync(device)
    t0 = time.perf_counter()
    value = None
    try:
        value = solve(on_step)
    except _TimeUp:
        pass
    sync(device)
    seconds = time.perf_counter() - t0
    done = max(count[0], 1)
    return {
        "steps_done": count[0], "complete": count[0] >= steps, "seconds": seconds,
        "ms_per_step": 1e3 * seconds / done, "value": value,
    }  # fmt: skip


# ---------------------------------------------------------------------- the measurements
@dataclass
class Context:
    """What every measurement shares: the scratch directory, device and sizes."""

    root: Path
    device: torch.device
    sizes: Sizes
    compile_backend: str
    _cifar: dict[str, Any] | None = None

    @property
    def device_name(self) -> str:
        return str(self.device)

    def cifar_data(self) -> dict[str, Any]:
        """A prepared directory of random CIFAR-10-shaped images (made once)."""
        if self._cifar is None:
            n = max(64, 2 * self.sizes.cifar_batch)
            path = synthetic_prepared(self.root, "cifar10", self.sizes.cifar_shape, n=n)
            self._cifar = {"name": "cifar10", "path": str(path)}
        return self._cifar


def _trainer(run: Any, blocks: list[int]) -> tuple[Any, float]:
    from ..training.train import StackTrainer

    t = time.perf_counter()
    tr = StackTrainer(run, blocks)
    return tr, time.perf_counter() - t


def _steps(ctx: Context, trainers: list[Any], cap: float) -> dict[str, Any]:
    """Time one round of ``train_step`` over ``trainers``; the losses must stay finite."""
    last: list[torch.Tensor] = []

    def step() -> None:
        last[:] = [tr.train_step() for tr in trainers]

    rec = time_steps(step, ctx.device, cap=cap, warmup=ctx.sizes.warmup)
    rec["loss_finite"] = all(bool(torch.isfinite(x).all()) for x in last)
    return rec


def mlp_stack(ctx: Context, k: int, cap: float) -> dict[str, Any]:
    """The paper MLP on TY, K blocks stacked in one trainer (K = 1: one plain block)."""
    run = toy_run(ctx.root, f"mlp-{k}", k, 10**6, ctx.sizes.mlp_batch, device=ctx.device_name)
    tr, build = _trainer(run, list(range(k)))
    rec = _steps(ctx, [tr], cap)
    params = sum(p.numel() for p in tr.stack.params.values()) // k
    return rec | {
        "K": k, "batch": ctx.sizes.mlp_batch, "params_per_net": params, "build_s": build,
        "rate": k * 1e3 / rec["ms_per_step"], "rate_unit": "block-steps/s",
    }  # fmt: skip


def cifar_step(ctx: Context, variant: str, cap: float) -> dict[str, Any]:
    """One CIFAR-10-sized U-Net block's training step: ``fp32``, ``bf16`` (autocast),
    ``bf16_ema`` (with the EMA of the weights) or ``bf16_compile`` (``torch.compile``)."""
    train: dict[str, Any] = {"precision": "fp32" if variant == "fp32" else "bf16"}
    if variant == "bf16_ema":
        train["ema"] = EMA_DECAY
    inductor = ctx.compile_backend == "inductor"
    if variant == "bf16_compile" and inductor:
        train["compile"] = True  # the real path: train.compile
    b = ctx.sizes.cifar_batch
    run = image_run(
        ctx.root, f"cifar-{variant}", ctx.sizes.cifar_net, {"kind": "equal", "blocks": 1}, b,
        data=ctx.cifar_data(), device=ctx.device_name, **train,
    )  # fmt: skip
    tr, build = _trainer(run, [0])
    if variant == "bf16_compile" and not inductor:  # another backend: as SingleNet does it
        tr.stack._call = torch.compile(tr.stack.net, backend=ctx.compile_backend)
    rec = _steps(ctx, [tr], cap)
    params = sum(p.numel() for p in tr.stack.params.values())
    rec |= {"batch": b, "params": params, "build_s": build, "rate": b * 1e3 / rec["ms_per_step"],
            "rate_unit": "images/s", "steps_per_s": 1e3 / rec["ms_per_step"]}  # fmt: skip
    if variant == "bf16_compile":
        rec["compile_backend"] = ctx.compile_backend
    return rec


def ema_update(ctx: Context, cap: float) -> dict[str, Any]:
    """The EMA update alone, as the trainer does it, over the CIFAR-10-sized U-Net's weights."""
    from ..runs.config import validate_config
    from ..runs.run_parts import Parts

    cfg = validate_config({"name": "gpu-ema", "net": ctx.sizes.cifar_net})
    net = Parts(cfg, shape=ctx.sizes.cifar_shape).new_net().to(ctx.device)
    params = [p.detach() for p in net.parameters()]
    ema = [p.clone() for p in params]
    rec = time_steps(
        lambda: torch._foreach_lerp_(ema, params, 1.0 - EMA_DECAY), ctx.device, cap=cap,
        warmup=ctx.sizes.warmup,
    )  # fmt: skip
    n = sum(p.numel() for p in params)
    rec |= {"params": n, "rate": 1e3 / rec["ms_per_step"], "rate_unit": "updates/s",
            "GB_per_s": 3 * 4 * n / (rec["ms_per_step"] / 1e3) / 1e9}  # fmt: skip
    return rec


def digits_unets(ctx: Context, stacked: bool, cap: float) -> dict[str, Any]:
    """K digits-sized U-Nets: one stacked trainer, or a loop over K single-block trainers."""
    k, b = ctx.sizes.digits_stack, ctx.sizes.digits_batch
    run = image_run(
        ctx.root, f"digits-{'stack' if stacked else 'loop'}", ctx.sizes.digits_net,
        {"kind": "equal", "blocks": k}, b, device=ctx.device_name,
    )  # fmt: skip
    t = time.perf_counter()
    if stacked:
        trainers = [_trainer(run, list(range(k)))[0]]
    else:
        trainers = [_trainer(run, [i])[0] for i in range(k)]
    build = time.perf_counter() - t
    rec = _steps(ctx, trainers, cap)
    return rec | {
        "K": k, "batch": b, "build_s": build, "rate": k * 1e3 / rec["ms_per_step"],
        "rate_unit": "block-steps/s",
    }  # fmt: skip


def digits_model(ctx: Context) -> tuple[Any, Any]:
    """An untrained SA model with the digits U-Net on the device, and the digits data."""
    from ..core.model import BlockModel
    from ..runs.config import validate_config
    from ..runs.run_parts import Parts

    cfg = validate_config({
        "name": "gpu-digits", "data": DIGITS_DATA, "net": ctx.sizes.digits_net,
        "partition": {"kind": "equal", "blocks": 1, "t0": 1e-3},
    })  # fmt: skip
    parts = Parts(cfg)
    torch.manual_seed(0)
    net = parts.new_net().to(ctx.device).eval().requires_grad_(False)
    model = BlockModel(parts.process, parts.partition, [net], shape=parts.shape)
    return model, parts.dataset


def _ode_record(ctx: Context, res: dict[str, Any], n: int) -> dict[str, Any]:
    per_image = res["ms_per_step"] / 1e3 * PAPER_RK4_STEPS / n
    return {
        "images": n, "rk4_steps_aimed": ctx.sizes.ode_steps, "rk4_steps_done": res["steps_done"],
        "complete": res["complete"], "seconds": res["seconds"], "ms_per_step": res["ms_per_step"],
        "evaluations_per_step": 4, "s_per_image_rk4_1000": per_image,
        "rate": 1.0 / per_image, "rate_unit": "images/s at RK4-1000",
    }  # fmt: skip


def likelihood(ctx: Context, cap: float) -> dict[str, Any]:
    """Hutchinson bits/dim (one probe held fixed, RK4) of digits test images."""
    from ..core.likelihood import log_likelihood
    from ..core.ode import SolverSettings

    model, data = digits_model(ctx)
    x = data.test_set(ctx.sizes.images).to(ctx.device)
    n = x.shape[0]

    def solve(steps: int, on_step: Callable[..., None] | None) -> torch.Tensor:
        return log_likelihood(
            model, x, solver=SolverSettings("rk4", steps), trace="hutchinson",
            generator=torch.Generator().manual_seed(0), on_step=on_step,
        )  # fmt: skip

    solve(1, None)  # warm-up
    res = time_solve(lambda hook: solve(ctx.sizes.ode_steps, hook), ctx.device,
                     steps=ctx.sizes.ode_steps, cap=cap)  # fmt: skip
    rec = _ode_record(ctx, res, n)
    if res["value"] is not None:
        nll = -res["value"].double().mean().item()
        rec |= {"nll_nats_untrained": nll, "bpd_untrained": float(data.bits_per_dim(nll))}
    return rec


def sampling(ctx: Context, cap: float) -> dict[str, Any]:
    """Probability-flow ODE sampling (RK4) of digits-sized images."""
    from ..core.ode import SolverSettings
    from ..core.sample import prior_sample, sample_ode

    model, _ = digits_model(ctx)
    gen = torch.Generator().manual_seed(0)
    x1 = prior_sample(ctx.sizes.images, model.shape, generator=gen, device=ctx.device)
    sample_ode(model, x1, solver=SolverSettings("rk4", 1))  # warm-up
    res = time_solve(
        lambda hook: sample_ode(model, x1, solver=SolverSettings("rk4", ctx.sizes.ode_steps),
                                on_step=hook),
        ctx.device, steps=ctx.sizes.ode_steps, cap=cap,
    )  # fmt: skip
    rec = _ode_record(ctx, res, x1.shape[0])
    if res["value"] is not None:
        rec["samples_finite"] = bool(torch.isfinite(res["value"]).all())
    return rec


@dataclass(frozen=True)
class Measurement:
    """One row: its key, what it is, and how to take it (``take(ctx, cap) -> record``)."""

    key: str
    label: str
    take: Callable[[Context, float], dict[str, Any]]
    min_budget: float = 0.0  # least budget left to start it (else skipped)
    cap_factor: float = 1.0  # its cap in units of ``Sizes.cap`` (ODE solves: longer)


def measurements(sizes: Sizes, device: torch.device) -> list[Measurement]:
    """The check's rows, in the order they run (the compiled step last: its compile time
    cannot be capped)."""
    rows = [
        Measurement(f"mlp_k{k}", f"paper MLP, {k} block{'s stacked' if k > 1 else ''}",
                    lambda c, cap, k=k: mlp_stack(c, k, cap))
        for k in sizes.mlp_blocks
    ]  # fmt: skip
    rows += [
        Measurement("cifar_fp32", "CIFAR-10 ddpm_unet step, float32",
                    lambda c, cap: cifar_step(c, "fp32", cap)),
        Measurement("cifar_bf16", "CIFAR-10 ddpm_unet step, bf16 autocast",
                    lambda c, cap: cifar_step(c, "bf16", cap)),
        Measurement("cifar_bf16_ema", "CIFAR-10 ddpm_unet step, bf16 + EMA",
                    lambda c, cap: cifar_step(c, "bf16_ema", cap)),
        Measurement("ema_update", "EMA update alone (CIFAR-10 ddpm_unet weights)", ema_update),
        Measurement("digits_loop", f"{sizes.digits_stack} digits U-Nets, loop of trainers",
                    lambda c, cap: digits_unets(c, False, cap)),
        Measurement("digits_stack", f"{sizes.digits_stack} digits U-Nets, stacked",
                    lambda c, cap: digits_unets(c, True, cap)),
        Measurement("nll_hutchinson", "digits bits/dim, Hutchinson, RK4", likelihood,
                    cap_factor=ODE_CAP_FACTOR),
        Measurement("sample_ode", "digits ODE sampling, RK4", sampling,
                    cap_factor=ODE_CAP_FACTOR),
        Measurement("cifar_bf16_compile", "CIFAR-10 ddpm_unet step, bf16 + torch.compile",
                    lambda c, cap: cifar_step(c, "bf16_compile", cap),
                    COMPILE_MIN_SECONDS if device.type == "cuda" else 0.0),
    ]  # fmt: skip
    return rows


def run_check(
    device: torch.device, sizes: Sizes, args: argparse.Namespace,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Take every measurement on ``device`` within the budget; ``on_row(result)`` after each.

    Returns:
        The result: ``machine``, ``device``, ``sizes``, ``rows`` (key → record, each with
        ``label``, ``ms_per_step``, ``rate``, ``rate_unit``, ``peak_mb``, or ``skipped`` /
        ``error``), ``ratios`` and ``elapsed_s``.
    """
    from ..progress import make_bar

    backend = getattr(args, "compile_backend", None) or (
        "eager" if device.type == "cpu" and getattr(args, "quick", False) else "inductor"
    )
    result: dict[str, Any] = {
        "benchmark": "gpu", "machine": machine_info(), "device": device_info(device),
        "quick": bool(getattr(args, "quick", False)), "sizes": _plain(vars_of(sizes)),
        "compile_backend": backend, "rows": {}, "complete": False,
    }  # fmt: skip
    rows = measurements(sizes, device)
    start = time.perf_counter()
    deadline = start + sizes.budget
    bar = make_bar(len(rows), desc="gpu check", unit="measurement",
                   disable=getattr(args, "no_progress", False))  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="psm-bench-gpu-") as tmp:
            ctx = Context(Path(tmp), device, sizes, backend)
            for m in rows:
                bar.set_postfix_str(m.key, refresh=False)
                left = deadline - time.perf_counter()
                rec: dict[str, Any] = {"label": m.label}
                if left <= 0 or left < m.min_budget:
                    rec["skipped"] = (
                        f"time budget spent ({max(left, 0):.0f} of {sizes.budget:.0f} s left)"
                    )
                else:
                    rec |= _take(ctx, m, min(sizes.cap * m.cap_factor, left))
                result["rows"][m.key] = rec
                result["ratios"] = ratios(result["rows"])
                result["elapsed_s"] = time.perf_counter() - start
                if on_row is not None:
                    on_row(result)
                bar.update(1)
    finally:
        bar.close()
    result["complete"] = True
    return result


def _take(ctx: Context, m: Measurement, cap: float) -> dict[str, Any]:
    """One measurement with its peak memory; an exception becomes an ``error`` entry."""
    t = time.perf_counter()
    try:
        with peak_memory(ctx.device) as mem:
            rec = m.take(ctx, cap)
        rec["peak_mb"] = mem["peak_mb"]
        rec["wall_s"] = time.perf_counter() - t
        return _plain(rec)
    except Exception as e:  # one failed row must not lose the others
        last = traceback.extract_tb(e.__traceback__)[-1]
        where = f" ({Path(last.filename).name}:{last.lineno})"
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        return {"error": msg + where}
    finally:
        if ctx.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The side-by-side figures: stacks against one block, bf16 and compile against fp32 and
    bf16, the EMA's cost per step, stacked digits U-Nets against the loop."""

    def ms(key: str) -> float | None:
        return rows.get(key, {}).get("ms_per_step")

    def rate(key: str) -> float | None:
        return rows.get(key, {}).get("rate")

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    out: dict[str, float | None] = {}
    for key in rows:
        if key.startswith("mlp_k") and key != "mlp_k1":
            out[f"{key}_vs_mlp_k1"] = div(rate(key), rate("mlp_k1"))
    out["cifar_bf16_vs_fp32"] = div(ms("cifar_fp32"), ms("cifar_bf16"))
    out["cifar_compile_vs_bf16"] = div(ms("cifar_bf16"), ms("cifar_bf16_compile"))
    ema, bf16 = ms("cifar_bf16_ema"), ms("cifar_bf16")
    out["ema_ms_per_step"] = ema - bf16 if ema is not None and bf16 is not None else None
    out["ema_share_of_step"] = div(ms("ema_update"), ms("cifar_bf16"))
    out["digits_stack_vs_loop"] = div(rate("digits_stack"), rate("digits_loop"))
    return out


# ---------------------------------------------------------------------- reporting
def device_info(device: torch.device) -> dict[str, Any]:
    """The device's name and the numerics switches that change its timings."""
    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gb": props.total_memory / 1e9, "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        }  # fmt: skip
    else:
        import platform

        info |= {"name": f"CPU ({platform.processor() or platform.machine()})",
                 "threads": torch.get_num_threads()}  # fmt: skip
    return info


def vars_of(sizes: Sizes) -> dict[str, Any]:
    return {k: getattr(sizes, k) for k in sizes.__dataclass_fields__}


def _plain(value: Any) -> Any:
    """JSON-ready: tuples as lists, non-finite floats as None, tensors as numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dumps(result: dict[str, Any]) -> str:
    import json

    return json.dumps(result, indent=1) + "\n"


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    s = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return s + unit


def markdown(result: dict[str, Any]) -> str:
    """The section for docs/benchmarks.md: a heading naming the device, date and torch
    version, how it was measured, the table and the ratios."""
    dev, s = result["device"], result["sizes"]
    date = result["machine"]["date"]
    head = f"## GPU check (`psm bench gpu`): {dev['name']}, {date}, torch {dev['torch']}"
    table_rows = []
    for key, r in result["rows"].items():
        if "skipped" in r or "error" in r:
            note = f"skipped: {r['skipped']}" if "skipped" in r else f"error: {r['error']}"
            table_rows.append([r["label"], "-", "-", "-", "-", note])
            continue
        rate = f"{_fmt(r['rate'])} {r['rate_unit']}"
        notes = _notes(key, r)
        table_rows.append([r["label"], _fmt(r["ms_per_step"]), rate, _fmt(r.get("peak_mb")),
                           _fmt(r.get("first_step_s")), notes])  # fmt: skip
    table = markdown_table(
        ["measurement", "ms per step", "rate", "peak memory (MiB)", "first step (s)", "notes"],
        table_rows,
    )
    q = result["ratios"]
    lines = []
    for key, v in q.items():
        if v is None:
            continue
        if key.endswith("_vs_mlp_k1"):
            lines.append(f"{key.split('_vs')[0].replace('mlp_k', 'paper MLP K = ')} stacked / "
                         f"one block: {v:.2f}x block-steps/s")  # fmt: skip
    named = {
        "cifar_bf16_vs_fp32": "CIFAR-10 U-Net step, bf16 autocast against float32: {:.2f}x",
        "cifar_compile_vs_bf16": "CIFAR-10 U-Net step, torch.compile against eager (bf16): {:.2f}x",
        "ema_ms_per_step": "the EMA's cost per step (bf16 + EMA minus bf16): {:.3g} ms",
        "ema_share_of_step": "the EMA update alone, as a share of the bf16 step: {:.1%}",
        "digits_stack_vs_loop": "digits U-Nets stacked / loop: {:.2f}x block-steps/s",
    }
    lines += [text.format(q[k]) for k, text in named.items() if q.get(k) is not None]
    extra = ""
    if dev["type"] == "cuda":
        extra = (f" CUDA {dev['cuda']}, cuDNN {dev['cudnn']}, TF32 matmul "
                 f"{'on' if dev['tf32_matmul'] else 'off'} / cuDNN "
                 f"{'on' if dev['tf32_cudnn'] else 'off'}.")  # fmt: skip
    quick = " **Quick sizes (`--quick`): a smoke test, not the paper's.**"
    quick = quick if result["quick"] else ""
    cuda = dev["type"] == "cuda"
    w = s["warmup"]
    sync = ", CUDA synchronized around every chunk" if cuda else ""
    memory = (
        "Peak memory: `torch.cuda.max_memory_allocated`, reset before each row (its nets and "
        "optimizer included)."
        if cuda
        else "Peak memory is not measured on the CPU."
    )
    body = (
        f"{head}\n\n"
        f"Device: {dev['name']}.{extra}{quick} Each row: {w} warm-up step{'s' * (w > 1)} (the "
        f"first timed apart), then timed chunks of steps for at most {s['cap']:g} s "
        f"(likelihood and sampling: {s['cap'] * ODE_CAP_FACTOR:g} s){sync}; ms per step is the "
        f"median over chunks. {memory} Paper MLP on TY, batch {s['mlp_batch']}; CIFAR-10 "
        f"U-Net on random {'x'.join(map(str, s['cifar_shape']))} images, batch "
        f"{s['cifar_batch']}; digits U-Nets batch {s['digits_batch']}; likelihood and sampling "
        f"over {s['images']} images per solve, seconds per image quoted at RK4 with "
        f"{PAPER_RK4_STEPS} steps (4 evaluations each; extrapolated where the cap cut the "
        f"solve). Whole check: {result.get('elapsed_s', 0):.0f} s.\n\n{table}\n\n"
        + "\n".join(f"- {line}" for line in lines)
        + "\n"
    )
    return body


def _notes(key: str, r: dict[str, Any]) -> str:
    if key.startswith("mlp_k"):
        return f"K = {r['K']}, {r['params_per_net']:,} params each, built in {r['build_s']:.1f} s"
    if key.startswith("cifar"):
        extra = f", backend {r['compile_backend']}" if "compile_backend" in r else ""
        return f"{r['params']:,} params, batch {r['batch']}, {r['steps_per_s']:.3g} steps/s{extra}"
    if key == "ema_update":
        return f"{r['params']:,} parameters, {r['GB_per_s']:.0f} GB/s"
    if key.startswith("digits"):
        return f"K = {r['K']}, batch {r['batch']}"
    if "rk4_steps_done" not in r:
        return ""
    done = f"{r['rk4_steps_done']}/{r['rk4_steps_aimed']} RK4 steps"
    note = f"{_fmt(r['s_per_image_rk4_1000'])} s per image at RK4-1000; {done}"
    if "bpd_untrained" in r:
        note += f"; bits/dim {r['bpd_untrained']:.3g} (untrained)"
    return note


def append_section(path: Path, markdown_text: str) -> None:
    """Append ``markdown_text`` to ``path`` (created if missing); what is there stays."""
    old = path.read_text() if path.exists() else ""
    sep = "" if not old or old.endswith("\n\n") else "\n" if old.endswith("\n") else "\n\n"
    atomic_write_text(path, old + sep + markdown_text.rstrip() + "\n")
