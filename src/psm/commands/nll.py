"""``psm nll RUN``: test NLL of a trained run, in nats, beside the data's true entropy.

The NLL is the mean of ``-log p₀(x)`` over the dataset's test set, ``log p₀`` from the
probability-flow ODE through the blocks (paper eqs. 4 and 6, :func:`psm.likelihood.evaluate_run`);
defaults come from the run's ``eval`` section. The result is printed and appended, with every
setting, as one JSON line to ``<run>/nll.jsonl`` (see :func:`nll_record`).

"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PSMError
from .model_flags import (
    DEFAULT_TOL,
    add_model_arguments,
    add_ode_arguments,
    check_positive,
    dtype_of,
    grid_field_for,
    ode_settings,
    resolve_device,
    warn,
)

if TYPE_CHECKING:  # torch is imported when a command runs, not when `psm` parses its flags
    from ..ode import SolverSettings

NLL_LOG = "nll.jsonl"
"""The file in a run directory that collects one JSON line per ``psm nll`` evaluation."""


# --------------------------------------------------------------------------- psm nll
def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nll",
        help="test negative log-likelihood of a trained run (nats)",
        description="Exact NLL of the run's test set through the probability-flow ODE, with its "
        "standard error and the data's true entropy (the floor) when known. Defaults come from "
        "the run's eval section; the result is appended to <run>/nll.jsonl.",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--n", type=int, help="test points (default: eval.n_test)")
    add_ode_arguments(p, steps_default="eval.steps")
    p.add_argument(
        "--trace",
        choices=["exact", "hutchinson"],
        default="exact",
        help="divergence: exact, or Hutchinson with one Rademacher probe per batch",
    )
    p.add_argument("--batch-size", type=int, default=1000, help="points per solve (default 1000)")
    p.add_argument("--seed", type=int, help="seed of the test set (default: eval.test_seed)")
    p.add_argument("--probe-seed", type=int, default=0, help="seed of the Hutchinson probes")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the record here")
    add_model_arguments(p)
    p.set_defaults(func=cmd_nll)


def cmd_nll(args: argparse.Namespace) -> int:
    from ..atomic import append_line, atomic_write_json
    from ..run import Run
    from ..trained import evaluate_run

    run = Run.open(args.run)
    ev = run.config.eval
    check_positive(n=args.n, batch_size=args.batch_size)
    ode = ode_settings(args, solver=ev.solver, steps=ev.steps, blocks=run.num_blocks)
    if args.json_out and not Path(args.json_out).parent.is_dir():
        raise PSMError(
            f"--json {args.json_out}: folder {Path(args.json_out).parent} does not exist"
        )
    device = resolve_device(args.device)
    grid_field = grid_field_for(args, run)
    n = args.n or ev.n_test
    test_seed = ev.test_seed if args.seed is None else args.seed
    res = evaluate_run(
        run, n=n, solver=ode, trace=args.trace, test_seed=test_seed, probe_seed=args.probe_seed,
        batch_size=args.batch_size, device=device, dtype=dtype_of(args.dtype),
        grid_field=grid_field, progress=not args.no_progress,
    )  # fmt: skip
    record = nll_record(
        run, res, solver=ode, trace=args.trace, test_seed=test_seed, probe_seed=args.probe_seed,
        batch_size=args.batch_size, device=str(device), dtype=args.dtype,
    )  # fmt: skip
    print(format_nll(record))
    append_line(run.path / NLL_LOG, json.dumps(record, allow_nan=False))
    print(f"appended to {run.path / NLL_LOG}", file=sys.stderr)
    if args.json_out:
        atomic_write_json(args.json_out, record)
        print(f"wrote {args.json_out}", file=sys.stderr)
    if not record["finite"]:
        import torch

        bad = int((~torch.isfinite(res.result.values)).sum())
        warn(f"{bad} of {record['n']} point(s) have a non-finite log-likelihood")
        return 1
    return 0


def _finite(x: float | None) -> float | None:
    """JSON-safe float: None for NaN/inf."""
    return x if x is not None and math.isfinite(x) else None


def nll_record(
    run,
    ev,
    *,
    solver: SolverSettings,
    trace: str,
    test_seed: int,
    probe_seed: int,
    batch_size: int,
    device: str,
    dtype: str,
) -> dict[str, Any]:
    """The JSON line ``psm nll`` appends to ``<run>/nll.jsonl``.

    Args:
        run: the :class:`~psm.run.Run`.
        ev: its :class:`~psm.likelihood.RunEvaluation`.
        solver, trace, test_seed, probe_seed, batch_size, device, dtype: the settings used.

    Returns:
        A JSON-safe dict: ``nll``, ``stderr`` (nats), ``n``, ``entropy`` (the floor, or null),
        ``gap`` (``nll - entropy``), ``finite``, ``seconds``, the run (``run``, ``name``,
        ``config_hash``, ``dataset``, ``process``, ``partition``, ``blocks``, ``train_steps``,
        ``t0``) and every setting; ``steps`` is null for dopri5, ``rtol``/``atol`` null for
        fixed-step solvers. Non-finite numbers are null.
    """
    from .. import __version__

    r = ev.result
    cfg = run.config
    gap = r.nll - ev.entropy if ev.entropy is not None else None
    adaptive = not solver.fixed_step
    steps = solver.steps
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": str(run.path),
        "name": cfg.name,
        "config_hash": run.hash,
        "dataset": ev.dataset,
        "process": cfg.process.name,
        "partition": run.partition.kind,
        "blocks": run.num_blocks,
        "train_steps": cfg.train.steps,
        "t0": run.partition.t0,
        "nll": _finite(r.nll),
        "stderr": _finite(r.stderr),
        "n": r.n,
        "entropy": ev.entropy,
        "gap": _finite(gap),
        "finite": r.finite,
        "seconds": round(r.seconds, 3),
        "solver": solver.method,
        "steps": None if adaptive else (steps if isinstance(steps, int) else list(steps)),
        "rtol": solver.rtol if adaptive else None,
        "atol": solver.atol if adaptive else None,
        "trace": trace,
        "grid_field": ev.grid_field,
        "batch_size": batch_size,
        "test_seed": test_seed,
        "probe_seed": probe_seed if trace == "hutchinson" else None,
        "device": device,
        "dtype": dtype,
        "host": socket.gethostname(),
        "psm_version": __version__,
    }


def format_nll(rec: dict[str, Any]) -> str:
    """Two lines for a person: the NLL ± s.e. beside the floor, then the settings."""

    def num(x: float | None) -> str:
        return f"{x:.4f}" if x is not None else "nan"

    head = f"{rec['name']}: NLL {num(rec['nll'])} ± {num(rec['stderr'])} nats"
    if rec["entropy"] is not None:
        head += f"   (true entropy, the floor: {rec['entropy']:.4f} nats; gap {num(rec['gap'])})"
    from ..ode import SolverSettings

    steps = rec["steps"] if rec["steps"] is not None else 1
    steps = steps if isinstance(steps, int) else tuple(steps)
    how = SolverSettings(rec["solver"], steps, rec["rtol"] or DEFAULT_TOL).describe()
    field = f", {rec['grid_field']} DPSM field" if rec["grid_field"] else ""
    detail = (
        f"  {rec['n']} test points of {rec['dataset']} (seed {rec['test_seed']}), {how}, "
        f"{rec['trace']} trace{field}, {rec['dtype']} on {rec['device']}, {rec['seconds']:.1f}s"
    )
    return f"{head}\n{detail}"
