"""``psm score RUN INPUT``: ``log p(x)`` of the user's own points or images under a trained run.

RUN is a run directory or a model written by ``psm export`` (which carries its data map, so
neither the run directory nor the data are needed). INPUT is read and mapped exactly as
training mapped the run's data
(:mod:`psm.runs.scoring`): for point runs a ``.npy``/``.csv`` ``[N, D]`` in the data's
coordinates; for image runs raw uint8 levels (``.npy``), a prepared directory (``--split``)
or an image folder / PNG / JPEG, dequantized as ``psm nll``'s headline ``psm`` convention with
noise seeded by ``--seed`` (default ``eval.test_seed``, so the run's own test images give
``psm nll``'s numbers): uniformly, or with ``--dequantization truncated-normal`` (``tn``) as
``psm nll --dequantization truncated-normal``. Points outside the data's support are scored, not
refused.

Output (``--out``): ``FILE.npy`` holds ``log p`` per input (nats, float64 ``[N]``);
``FILE.npz`` holds ``log_prob`` (the same), for image runs ``bits_per_dim`` (psm convention;
``log_q``, the noise's log-density per image, under truncated-normal dequantization), and
``settings`` (a JSON string: run, input, solver, trace, seeds, convention, dequantization). The
summary
(mean ± standard error) is printed either way. Solver flags and defaults are ``psm nll``'s.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import PSMError
from .model_flags import (
    add_grid_argument,
    add_model_arguments,
    add_ode_arguments,
    check_positive,
    dtype_of,
    format_cost,
    grid_field_for,
    resolve_device,
    set_threads,
    warn,
)
from .nll import TRACE_CHOICES, add_dequantization_argument, resolve_settings

OUT_SUFFIXES = (".npy", ".npz")


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="log p(x) of your own points or images under a trained run (nats; bits/dim)",
        description="log p of each input through the probability-flow ODE, mapped exactly as "
        "in training: point runs read a .npy or .csv [N, D]; image runs a uint8 .npy of levels "
        "([N, H, W], [N, H, W, C] or [N, C, H, W]), a prepared directory or an image folder, "
        "dequantized as psm nll's psm convention. Prints the mean ± s.e.; --out FILE.npy "
        "writes log p per input (nats), FILE.npz also bits/dim for images.",
    )
    p.add_argument("run", help="run directory, or a model written by psm export")
    p.add_argument("input", help="points (.npy, .csv) or images (.npy, prepared dir, folder)")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="FILE.npy: log p per input (nats, float64); FILE.npz: log_prob, bits_per_dim "
        "(image runs) and settings (an existing file is refused)",
    )
    p.add_argument(
        "--split",
        choices=("test", "train"),
        help="a prepared directory's split to score (default test)",
    )
    add_ode_arguments(p, steps_default="eval.steps")
    add_grid_argument(p)
    p.add_argument(
        "--trace",
        choices=TRACE_CHOICES,
        default="auto",
        help="divergence: exact, Hutchinson, or auto: exact up to 16 dimensions (default auto)",
    )
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per solve (default 1)")
    p.add_argument("--force", action="store_true", help="allow --trace exact above 16 dimensions")
    p.add_argument("--batch-size", type=int, default=1000, help="inputs per solve (default 1000)")
    p.add_argument(
        "--seed",
        type=int,
        help="image runs: seed of the dequantization noise (default: eval.test_seed)",
    )
    add_dequantization_argument(p)
    p.add_argument("--probe-seed", type=int, default=0, help="seed of the Hutchinson probes")
    add_model_arguments(p)
    p.set_defaults(func=cmd_score, convention="psm")


def check_out(out: str | None) -> Path | None:
    """Refuse an ``--out`` that exists, has another suffix, or lies in a missing folder."""
    if out is None:
        return None
    path = Path(out)
    if path.suffix.lower() not in OUT_SUFFIXES:
        raise PSMError(f"--out {out}: use FILE.npy (log p) or FILE.npz (log p and bits/dim)")
    if path.exists() or path.is_symlink():
        raise PSMError(f"--out {out} exists; choose a new file")
    if not path.parent.is_dir():
        raise PSMError(f"--out {out}: folder {path.parent} does not exist")
    return path


def cmd_score(args: argparse.Namespace) -> int:
    from ..data.prepare import META_FILE
    from ..runs.inference import check_dequantization
    from ..runs.scoring import load_scoring_model, open_for_scoring, read_input, score_inputs

    out = check_out(args.out)
    run = open_for_scoring(args.run)
    check_dequantization(run, args.dequantization)  # before reading: points refuse it
    set_threads(args)
    check_positive(batch_size=args.batch_size, probes=args.probes)
    seed = run.config.eval.test_seed if args.seed is None else args.seed
    if args.split is not None and not (Path(args.input) / META_FILE).is_file():
        raise PSMError(f"--split applies to a prepared directory; {args.input} is not one")
    inputs = read_input(
        run, args.input, seed=seed, split=args.split or "test", dequantization=args.dequantization
    )
    settings = resolve_settings(args, run)  # after the input: its warning is not an error's
    image = settings.convention is not None
    if args.seed is not None and not image:
        warn("--seed seeds the dequantization of images; ignored for point data")
    device = resolve_device(args.device)
    grid_field = grid_field_for(args, run)
    dtype = dtype_of(args.dtype)
    model = load_scoring_model(run, device=device, dtype=dtype, grid_field=grid_field)
    scores = score_inputs(
        model, inputs.x, run.dataset, settings, probe_seed=args.probe_seed,
        batch_size=args.batch_size, device=device, dtype=dtype, progress=not args.no_progress,
        log_q=inputs.log_q,
    )  # fmt: skip
    bits = scores.bits
    info = {
        "run": str(run.path), "input": str(args.input), "n": inputs.n,
        "split": args.split if image and args.split else None,
        "dequantization_seed": seed if image else None, "probe_seed": args.probe_seed,
        "solver": settings.solver.describe(), "trace": settings.trace, "probes": settings.probes,
        "t0": settings.t0, "batch_size": args.batch_size, "device": str(device),
        "dtype": args.dtype, "grid_field": grid_field if run.partition.kind == "grid" else None,
        "log_prob": "log-density of the model-space point, nats (psm nll's NLL is its mean, "
        "negated)",
        "bits_per_dim": _label(scores) if image else None,
        "dequantization": bits.dequantization if bits else None,
        "dequantization_scale": bits.noise_scale if bits else None,
    }  # fmt: skip
    print(format_scores(scores, info, name=run.config.name))
    if out is not None:
        write_scores(out, scores, info)
        what = "log p per input, nats" + (", bits/dim per image" if image and _npz(out) else "")
        print(f"wrote {out} ({what})", file=sys.stderr)
        if image and not _npz(out):
            print("  (--out FILE.npz also keeps bits/dim per image)", file=sys.stderr)
    if not scores.result.finite:
        import torch

        bad = int((~torch.isfinite(scores.result.values)).sum())
        warn(f"{bad} of {inputs.n} input(s) have a non-finite log-likelihood")
        return 1
    return 0


def _npz(path: Path) -> bool:
    return path.suffix.lower() == ".npz"


def _label(scores) -> str:
    from ..runs.nll_records import convention_label

    b = scores.bits
    return str(convention_label("psm", b.levels, b.dequantization, b.noise_scale))


def write_scores(out: Path, scores, info: dict[str, Any]) -> None:
    """``log p`` (``.npy``), or ``log_prob``, ``bits_per_dim`` and ``settings`` (``.npz``),
    written atomically."""
    import numpy as np

    from ..runs.atomic import atomic_write_bytes

    logp = scores.log_prob.detach().double().cpu().numpy()
    buf = io.BytesIO()
    if _npz(out):
        arrays = {"log_prob": logp, "settings": np.array(json.dumps(info))}
        if scores.bits is not None:
            arrays["bits_per_dim"] = scores.bits.values.detach().double().cpu().numpy()
        if scores.bits is not None and scores.bits.log_q is not None:
            arrays["log_q"] = scores.bits.log_q.detach().double().cpu().numpy()
        np.savez(buf, **arrays)
    else:
        np.save(buf, logp)
    atomic_write_bytes(out, buf.getvalue())


def format_scores(scores, info: dict[str, Any], *, name: str) -> str:
    """The summary: mean ± s.e. (bits/dim with its convention for images), the log p range,
    then the settings."""

    def num(x: float, digits: int = 4) -> str:
        return f"{x:.{digits}f}" if math.isfinite(x) else "nan"

    res = scores.result
    lp = scores.log_prob
    finite = lp[lp.isfinite()]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (math.nan,) * 2
    trace = info["trace"] + " trace"
    if info["trace"] == "hutchinson":
        trace += f" ({info['probes']} probe{'s' if info['probes'] > 1 else ''} per solve)"
    field = f", {info['grid_field']} DPSM field" if info["grid_field"] else ""
    image = scores.bits is not None
    cost = format_cost(res.seconds, res.n, "image" if image else "point", None, "")
    how = f"{info['solver']}, {trace}{field}, {info['dtype']} on {info['device']}, {cost}"
    if not image:
        head = (
            f"{name}: log p {num(-res.nll)} ± {num(res.stderr)} nats per point "
            f"(NLL {num(res.nll)}), {info['n']} input(s) from {info['input']}"
        )
        return f"{head}\n  min {num(lo, 3)}, max {num(hi, 3)}; {how}"
    b = scores.bits
    head = (
        f"{name}: {num(b.bpd)} ± {num(b.stderr)} bits/dim [{info['bits_per_dim']}], "
        f"{info['n']} image(s) from {info['input']}"
    )
    detail = (
        f"  log p {num(-res.nll, 2)} ± {num(res.stderr, 2)} nats per image ({b.dims} dims, "
        f"model space); min {num(lo, 2)}, max {num(hi, 2)}; trivial bound log2 {b.levels} = "
        f"{b.trivial:.4f} bits/dim"
    )
    deq = "truncated-normal " if info.get("dequantization") == "truncated-normal" else ""
    seeds = f"  {deq}dequantization seed {info['dequantization_seed']}, {how}"
    return f"{head}\n{detail}\n{seeds}"
