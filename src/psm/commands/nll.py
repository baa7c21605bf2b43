"""``psm nll RUN``: test NLL of a trained run, in nats beside the data's true entropy, and for
image runs in bits/dim beside the trivial bound ``log2 L``. RUN is a run directory or a model
written by ``psm export``: its test set is rebuilt from the config (toys, mixtures, the bundled
digits) or read from the recorded data files when they are here; otherwise one line says that
the test set needs the data and points to ``psm score``.

The NLL is the mean of ``-log p₀(x)`` over the dataset's test set, ``log p₀`` from the
probability-flow ODE through the blocks (paper eqs. 4 and 6,
:func:`psm.runs.inference.evaluate_run`);
defaults come from the run's ``eval`` section. Image runs report bits/dim in one of two
conventions (``--convention``, see :mod:`psm.runs.inference`): ``psm`` (the headline: dequantized
test images, an upper bound on the discrete NLL) or ``authors`` (what the authors' scripts
compute; labelled as such wherever it appears). The psm convention dequantizes uniformly
(``x = (k + u) / L``, the default) or, with ``--dequantization truncated-normal`` (``tn``),
with i-DODE's training-free truncated-normal noise (:mod:`psm.data.dequantize`); the
dequantization is named next to the convention in every output. The trace is exact up to 16
dimensions and Hutchinson above (``--trace auto``; one warning line says so); ``--trace exact``
above 16 dimensions is refused unless ``--force``, since it costs D backward passes per
evaluation.

The result is printed and appended (for a run directory), with every setting, as one JSON line to
``<run>/nll.jsonl`` (see :func:`nll_record`), and written to TensorBoard (``eval/nll``,
``eval/bpd``; ``eval/nll_authors``, ``eval/bpd_authors`` for the authors' convention) when it
is installed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PSMError
from ..runs.nll_records import NLL_LOG, nll_record
from .model_flags import (
    add_grid_argument,
    add_model_arguments,
    add_ode_arguments,
    check_positive,
    dtype_of,
    format_cost,
    grid_field_for,
    ode_settings,
    peak_memory,
    reset_peak_memory,
    resolve_device,
    set_threads,
    warn,
)

if TYPE_CHECKING:  # torch is imported when a command runs, not when `psm` parses its flags
    from ..core.ode import SolverSettings
    from ..runs.inference import EvalSettings


TRACE_CHOICES = ("auto", "exact", "hutchinson")
CONVENTION_CHOICES = ("psm", "authors")  # psm.runs.inference.CONVENTIONS (tested)
DEQUANTIZATION_CHOICES = ("uniform", "truncated-normal")  # psm.data.dequantize (tested)
DEQUANTIZATION_ALIASES = {"tn": "truncated-normal"}  # psm.data.dequantize.ALIASES (tested)


def add_dequantization_argument(p: argparse.ArgumentParser, default: str | None = "uniform",
                                extra: str = "") -> None:  # fmt: skip
    """``--dequantization uniform|truncated-normal`` (``--dequant``; ``tn`` for short)."""
    p.add_argument(
        "--dequantization",
        "--dequant",
        type=lambda name: DEQUANTIZATION_ALIASES.get(name, name),
        choices=DEQUANTIZATION_CHOICES,
        default=default,
        help="image runs, psm convention: how test levels are dequantized: uniform (x = "
        "(k+u)/L) or truncated-normal (tn: i-DODE's training-free noise, sigma/alpha at t0 cut "
        f"to the level's bin; an evaluation option){extra} (default {default or 'uniform'})",
    )


# --------------------------------------------------------------------------- psm nll
def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nll",
        help="test negative log-likelihood of a trained run (nats; bits/dim for images)",
        description="NLL of the run's test set through the probability-flow ODE, with its "
        "standard error and the data's true entropy (the floor) when known; for image runs "
        "bits/dim beside the trivial bound log2 L. Defaults come from the run's eval section; "
        "the result is appended to <run>/nll.jsonl.",
    )
    p.add_argument("run", help="run directory, or a model written by psm export")
    p.add_argument("--n", type=int, help="test points (default: eval.n_test)")
    add_ode_arguments(p, steps_default="eval.steps")
    add_grid_argument(p)
    p.add_argument(
        "--trace",
        choices=TRACE_CHOICES,
        default="auto",
        help="divergence: exact, Hutchinson (Rademacher probes), or auto: exact up to 16 "
        "dimensions, Hutchinson above (default auto)",
    )
    p.add_argument(
        "--probes",
        type=int,
        default=1,
        help="Hutchinson probes averaged per solve, each held fixed through it (default 1)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="allow --trace exact above 16 dimensions (D backward passes per evaluation)",
    )
    p.add_argument(
        "--convention",
        choices=CONVENTION_CHOICES,
        default="psm",
        help="image runs: psm (dequantized bits/dim, the headline) or authors (the authors' "
        "scripts: k/(L-1) minus the train mean, t0 0.001, RK4 1000//K steps per block, "
        "probe redrawn at every evaluation) (default psm)",
    )
    add_dequantization_argument(p)
    p.add_argument("--batch-size", type=int, default=1000, help="points per solve (default 1000)")
    p.add_argument("--seed", type=int, help="seed of the test set (default: eval.test_seed)")
    p.add_argument("--probe-seed", type=int, default=0, help="seed of the Hutchinson probes")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the record here")
    p.add_argument(
        "--values",
        metavar="FILE.npy",
        help="also write each test point's NLL (nats, float64) here, for paired comparisons of "
        "runs scored on the same points (an existing file is refused); with truncated-normal "
        "dequantization also FILE.npy.json (the dequantization and log q per point)",
    )
    p.add_argument(
        "--exact-blocks",
        metavar="IDS",
        help="replace these blocks (e.g. 0,2-4) by the data's exact score (2D mixtures): where "
        "the NLL is lost, by block; a diagnostic, not appended to nll.jsonl",
    )
    add_model_arguments(p)
    p.set_defaults(func=cmd_nll)


def resolve_settings(args: argparse.Namespace, run) -> EvalSettings:
    """The evaluation settings from the flags, checked; one warning line when the exact trace
    is replaced by Hutchinson's.

    Raises:
        PSMError: a flag that does not apply (``--probes`` with the exact trace, ``--trace
            exact`` above 16 dimensions without ``--force``, the authors' convention on data
            without levels, an adaptive solver with probes redrawn at every evaluation).
    """
    from ..core.likelihood import EXACT_TRACE_MAX_DIM
    from ..runs.inference import eval_settings

    flags_set = args.solver is not None or args.steps is not None
    solver = ode_settings(args, run.config.eval.solver_settings(), blocks=run.num_blocks)
    if args.convention == "authors" and not flags_set:
        solver = None  # the convention's own solver
    trace = None if args.trace == "auto" else args.trace
    settings = eval_settings(
        run, convention=args.convention, solver=solver, trace=trace, probes=args.probes,
        dequantization=getattr(args, "dequantization", None) or "uniform",
    )  # fmt: skip
    dims = math.prod(run.shape)
    if settings.trace == "exact" and args.probes > 1:
        raise PSMError("--probes applies to the Hutchinson trace (the trace is exact)")
    if args.trace == "exact" and dims > EXACT_TRACE_MAX_DIM and not args.force:
        raise PSMError(
            f"--trace exact on {dims}-dimensional data costs {dims} backward passes per "
            f"function evaluation; use --trace hutchinson (--probes N), or add --force"
        )
    if settings.redraw == "evaluation" and not settings.solver.fixed_step:
        raise PSMError(
            f"the authors' convention redraws the probe at every evaluation, which needs a "
            f"fixed-step solver, not {settings.solver.method}"
        )
    if args.trace == "auto" and settings.trace == "hutchinson" and args.convention == "psm":
        warn(
            f"{dims} dimensions > {EXACT_TRACE_MAX_DIM}: Hutchinson trace ({_probes(settings)}) "
            f"instead of the exact one ({dims} backward passes per evaluation)"
        )
    return settings


def _probes(settings) -> str:
    p = settings.probes
    every = "per solve, held fixed" if settings.redraw == "solve" else "redrawn every evaluation"
    return f"{p} probe{'s' if p > 1 else ''} {every}"


def cmd_nll(args: argparse.Namespace) -> int:
    from ..runs.atomic import append_line, atomic_write_json
    from ..runs.inference import evaluate_run, open_source

    run = open_source(args.run)  # a run directory or an exported file
    run.test_data()  # a changed or vanished data file, before anything is built from it
    set_threads(args)
    check_positive(n=args.n, batch_size=args.batch_size, probes=args.probes)
    settings = resolve_settings(args, run)
    if args.json_out and not Path(args.json_out).parent.is_dir():
        raise PSMError(
            f"--json {args.json_out}: folder {Path(args.json_out).parent} does not exist"
        )
    if args.values and (Path(args.values).exists() or not Path(args.values).parent.is_dir()):
        why = "exists" if Path(args.values).exists() else "is in a folder that does not exist"
        raise PSMError(f"--values {args.values} {why}")
    exact = []
    if args.exact_blocks:
        from .kl import blocks_of

        exact = blocks_of(args.exact_blocks, run.num_blocks)
    tn = settings.dequantization == "truncated-normal"
    if args.values and tn and Path(values_settings_path(args.values)).exists():
        raise PSMError(f"--values {args.values}: {values_settings_path(args.values)} exists")
    device = resolve_device(args.device)
    grid_field = grid_field_for(args, run)
    ev = run.config.eval
    n = args.n or ev.n_test
    test_seed = ev.test_seed if args.seed is None else args.seed
    reset_peak_memory(device)
    res = evaluate_run(
        run, n=n, solver=settings.solver, trace=settings.trace, probes=settings.probes,
        redraw=settings.redraw, convention=args.convention, test_seed=test_seed,
        probe_seed=args.probe_seed, batch_size=args.batch_size, device=device,
        dtype=dtype_of(args.dtype), grid_field=grid_field, progress=not args.no_progress,
        dequantization=settings.dequantization or "uniform", exact_blocks=exact,
    )  # fmt: skip
    memory, memory_kind = peak_memory(device)
    record = nll_record(
        run, res, solver=res.settings.solver, trace=res.settings.trace, test_seed=test_seed,
        probe_seed=args.probe_seed, batch_size=args.batch_size, device=str(device),
        dtype=args.dtype, peak_memory_mb=memory, memory_kind=memory_kind,
    )  # fmt: skip
    if exact:
        record["exact_blocks"] = exact
    print(format_nll(record))
    if exact:
        print(f"not appended to {NLL_LOG}: blocks {args.exact_blocks} are the exact score, not "
              "the run's", file=sys.stderr)  # fmt: skip
    elif run.run is not None:
        append_line(run.path / NLL_LOG, json.dumps(record, allow_nan=False))
        print(f"appended to {run.path / NLL_LOG}", file=sys.stderr)
        log_tensorboard(run.run, record)
    else:
        print(f"{run.path} is an exported model: no {NLL_LOG} (--json keeps the record)",
              file=sys.stderr)  # fmt: skip
    if args.json_out:
        atomic_write_json(args.json_out, record)
        print(f"wrote {args.json_out}", file=sys.stderr)
    if args.values:
        import numpy as np

        np.save(args.values, res.result.values.detach().double().cpu().numpy())
        print(f"wrote {args.values} (NLL per point, nats)", file=sys.stderr)
        if tn:
            side = values_settings_path(args.values)
            atomic_write_json(side, values_settings(record, res))
            print(f"wrote {side} (truncated-normal dequantization, log q per point)",
                  file=sys.stderr)  # fmt: skip
    if not record["finite"]:
        import torch

        bad = int((~torch.isfinite(res.result.values)).sum())
        warn(f"{bad} of {record['n']} point(s) have a non-finite log-likelihood")
        return 1
    return 0


def values_settings_path(values: str | Path) -> Path:
    """Where ``--values FILE.npy`` keeps its truncated-normal dequantization: ``FILE.npy.json``
    (uniform values, psm's default and the only kind before, have none)."""
    return Path(f"{values}.json")


def values_settings(record: dict[str, Any], res) -> dict[str, Any]:
    """What ``psm compare --values`` needs of truncated-normal values beside the NLLs: the
    dequantization, its noise and ``log q`` per point (bits/dim ``(nll + log_q) / (D ln 2)``)."""
    bits = res.bits
    return {
        "values": "NLL per point, nats, of the model-space point (as psm nll's nll)",
        "dequantization": record["dequantization"],
        "convention_label": record["convention_label"],
        "dequantization_scale": record["dequantization_scale"],
        "t0": record["t0"], "n": record["n"], "test_seed": record["test_seed"],
        "dims": record["dims"], "config_hash": record["config_hash"],
        "log_q": [float(v) for v in bits.log_q.tolist()],
    }  # fmt: skip


def log_tensorboard(run, record: dict[str, Any]) -> None:
    """``eval/nll`` and ``eval/bpd`` (``_authors`` for the authors' convention, ``_tn`` for
    truncated-normal dequantization) at the run's furthest trained step, when TensorBoard is
    installed."""
    from ..runs.tensorboard import add_scalars, summary_writer

    writer = summary_writer(run.path)
    if writer is None:
        return
    suffix = "_authors" if record["convention"] == "authors" else ""
    if record.get("dequantization") == "truncated-normal":
        suffix = "_tn"
    values = {f"eval/nll{suffix}": record["nll"], f"eval/bpd{suffix}": record.get("bpd")}
    step = max((run.ledger.status(b).step for b in range(run.num_blocks)), default=0)
    add_scalars(writer, {k: v for k, v in values.items() if v is not None}, step)
    writer.close()


def record_solver(rec: dict[str, Any]) -> SolverSettings:
    """The solver an ``nll.jsonl`` line was computed with: the inverse of :func:`nll_record`'s
    ``solver``/``steps``/``rtol``/``atol`` (null fields keep :class:`SolverSettings`'
    defaults)."""
    from ..core.ode import SolverSettings

    given: dict[str, Any] = {k: rec[k] for k in ("rtol", "atol", "grid") if rec.get(k) is not None}
    if rec["steps"] is not None:  # null for adaptive solvers
        steps = rec["steps"]
        given["steps"] = steps if isinstance(steps, int) else tuple(steps)
    return SolverSettings(rec["solver"], **given)


def format_nll(rec: dict[str, Any]) -> str:
    """Lines for a person: the figure ± s.e. beside its floor or bound, then the settings.

    2D data: ``NLL ± s.e. nats`` beside the true entropy. Image data: ``bits/dim ± s.e.`` with
    its convention, the trivial bound ``log2 L`` and the NLL in nats per image.
    """

    def num(x: float | None, digits: int = 4) -> str:
        return f"{x:.{digits}f}" if x is not None else "nan"

    how = record_solver(rec).describe()
    field = f", {rec['grid_field']} DPSM field" if rec["grid_field"] else ""
    trace = f"{rec['trace']} trace"
    if rec["trace"] == "hutchinson":
        p = rec["probes"]
        every = "per solve" if rec["probe_redraw"] == "solve" else "redrawn every evaluation"
        trace += f" ({p} probe{'s' if p > 1 else ''} {every})"
    cost = format_cost(
        rec["seconds"], rec["n"], "image" if rec["bpd_trivial"] is not None else "point",
        rec.get("peak_memory_mb"), rec.get("memory_kind") or "",
    )  # fmt: skip
    if rec.get("exact_blocks"):
        field += f", blocks {','.join(map(str, rec['exact_blocks']))} replaced by the exact score"
    if rec["bpd_trivial"] is None:
        head = f"{rec['name']}: NLL {num(rec['nll'])} ± {num(rec['stderr'])} nats"
        if rec["entropy"] is not None:
            head += (
                f"   (true entropy, the floor: {rec['entropy']:.4f} nats; gap {num(rec['gap'])})"
            )
        detail = (
            f"  {rec['n']} test points of {rec['dataset']} (seed {rec['test_seed']}), {how}, "
            f"{trace}{field}, {rec['dtype']} on {rec['device']}, {cost}"
        )
        return f"{head}\n{detail}"
    levels = rec["levels"]
    head = (
        f"{rec['name']}: {num(rec['bpd'])} ± {num(rec['bpd_stderr'])} bits/dim "
        f"[{rec['convention_label']}]"
    )
    bound = (
        f"  trivial bound log2 {levels} = {rec['bpd_trivial']:.4f} bits/dim; "
        f"NLL {num(rec['nll'], 2)} ± {num(rec['stderr'], 2)} nats per image ({rec['dims']} dims)"
    )
    tag = " (authors' convention)" if rec["convention"] == "authors" else ""
    if rec.get("dequantization") == "truncated-normal":
        bound += f"; log q(δ) {num(rec['dequantization_log_q'], 2)} nats per image"
        tag = ", truncated-normal dequantization"
    detail = (
        f"  {rec['n']} test images of {rec['dataset']} (seed {rec['test_seed']}){tag}, {how} "
        f"from t0 = {rec['t0']:g}, {trace}{field}, {rec['dtype']} on {rec['device']}, {cost}"
    )
    return f"{head}\n{bound}\n{detail}"
