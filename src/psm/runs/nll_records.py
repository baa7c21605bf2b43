"""The NLL record: one JSON line per evaluation of a run, appended to ``<run>/nll.jsonl``.

``psm nll`` appends one per call; the experiments' harness (:mod:`psm.experiments.harness`)
appends the same record and reads it back as its score cache. A record carries the figure,
every setting that produced it (:data:`IDENTITY`: two records that agree on these fields are the
same evaluation of the same weights) and the training the weights had when they were scored.
"""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import append_line

if TYPE_CHECKING:  # torch is imported when a command runs, not when `psm` parses its flags
    from ..core.ode import SolverSettings
    from .inference import EvalSettings, RunEvaluation
    from .run import Run

NLL_LOG = "nll.jsonl"
"""The file in a run directory that collects one JSON line per evaluation."""

IDENTITY: tuple[str, ...] = (
    "config_hash", "train_steps", "t0", "convention", "dequantization", "n", "solver", "steps",
    "rtol", "atol", "grid", "trace", "probes", "probe_redraw", "grid_field", "batch_size",
    "test_seed", "probe_seed", "device", "dtype",
)  # fmt: skip
"""The record fields that fix an evaluation: the problem and step target (``config_hash``,
``train_steps``) and every setting of the likelihood. Equal on these, two records hold the same
number (the trained weights aside: see ``trained_block_steps``). A psm-convention record
written before ``dequantization`` existed reads as ``"uniform"`` (:func:`identity_value`)."""


def _finite(x: float | None) -> float | None:
    """JSON-safe float: None for NaN/inf."""
    return x if x is not None and math.isfinite(x) else None


def convention_label(
    convention: str | None,
    levels: int | None,
    dequantization: str | None = "uniform",
    noise_scale: float | None = None,
) -> str | None:
    """What a bits/dim figure means, in words (printed and recorded with every figure): the
    convention and, for psm's, the dequantization (:mod:`psm.data.dequantize`)."""
    if convention is None:
        return None
    if convention == "authors":
        return (
            f"authors' convention: log2 {levels} - log p/(D ln 2) on k/{levels - 1} minus the "
            "training mean, not dequantized (not a bound on the discrete NLL)"
        )
    if dequantization == "truncated-normal":
        r = f"{noise_scale:.3g}" if noise_scale is not None else "σ/α at t0"
        return (
            f"psm convention, truncated-normal dequantization (i-DODE): y = bin centre of k + "
            f"δ, δ ~ N(0, r²) cut to the bin, r = σ/α at t0 = {r}; bits/dim = "
            "(NLL + log q(δ))/(D ln 2)"
        )
    return (
        f"psm convention: dequantized x = (k+u)/{levels}, uniform dequantization, with "
        f"log2 {levels} and the data map's log-Jacobian"
    )


def _train_steps(run: Run) -> int | list[int]:
    """The run's step target as a record holds it: ``train.block_steps`` or ``train.steps``."""
    train = run.config.train
    return list(train.block_steps) if train.block_steps else train.steps


def _steps(solver: SolverSettings) -> int | list[int] | None:
    """The record's ``steps``: None for adaptive solvers, a list for steps per block."""
    if not solver.fixed_step:
        return None
    return solver.steps if isinstance(solver.steps, int) else list(solver.steps)


def _grid(solver: SolverSettings) -> str | None:
    """The record's ``grid``: None for the default uniform steps (so records made before grids
    existed, which lack the field, keep their identity), else the grid's name."""
    return None if solver.grid == "uniform" else solver.grid


def trained(run: Run) -> tuple[int, float]:
    """A run's training so far: block-steps summed over its blocks, and the longest block's
    training seconds."""
    statuses = run.ledger.statuses()
    return sum(s.step for s in statuses), max((s.wall_time for s in statuses), default=0.0)


def nll_record(
    run: Run,
    ev: RunEvaluation,
    *,
    solver: SolverSettings,
    trace: str,
    test_seed: int,
    probe_seed: int,
    batch_size: int,
    device: str,
    dtype: str,
    peak_memory_mb: float | None = None,
    memory_kind: str | None = None,
) -> dict[str, Any]:
    """The JSON line appended to ``<run>/nll.jsonl`` for one evaluation.

    Args:
        run: the :class:`~psm.runs.run.Run`.
        ev: its :class:`~psm.runs.inference.RunEvaluation`.
        solver, trace, test_seed, probe_seed, batch_size, device, dtype: the settings used.
        peak_memory_mb, memory_kind: the peak memory and what it measured.

    Returns:
        A JSON-safe dict: ``nll``, ``stderr`` (nats), ``n``, ``entropy`` (the floor, or null),
        ``gap`` (``nll - entropy``), ``finite``, ``seconds``, ``seconds_per_point``,
        ``peak_memory_mb``, the run (``run``, ``name``, ``config_hash``, ``dataset``,
        ``process``, ``partition``, ``blocks``, ``train_steps``, ``t0``: where the integral
        started, ``run_t0``: the run's own), the training its weights had
        (``trained_block_steps``: steps summed over the blocks, ``train_seconds``: the longest
        block's training seconds) and every setting (``probes`` and ``probe_redraw`` for
        Hutchinson); for image data ``convention``, ``convention_label``, ``bpd``,
        ``bpd_stderr``, ``bpd_trivial`` (log2 L), ``levels``, ``dims``, ``dequantized``,
        ``dequantization`` (psm convention: ``"uniform"`` or ``"truncated-normal"``; null for
        the authors'), for truncated-normal ``dequantization_scale`` (``σ_t0/α_t0``, model
        units) and ``dequantization_log_q`` (the mean ``log q`` per image, nats: ``bpd = (nll +
        dequantization_log_q) / (dims ln 2)``), ``log_scale_per_dim`` (null otherwise).
        ``steps`` is null for dopri5, ``rtol``/``atol`` null for fixed-step solvers. Non-finite
        numbers are null.
    """
    from .. import __version__

    r = ev.result
    cfg = run.config
    gap = r.nll - ev.entropy if ev.entropy is not None else None
    adaptive = not solver.fixed_step
    s = ev.settings
    bits = ev.bits
    hutch = trace == "hutchinson"
    block_steps, train_seconds = trained(run)
    label = log_q = None
    if bits:
        label = convention_label(bits.convention, bits.levels, bits.dequantization,
                                 bits.noise_scale)  # fmt: skip
        log_q = _finite(float(bits.log_q.mean())) if bits.log_q is not None else None
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": str(run.path),
        "name": cfg.name,
        "config_hash": run.hash,
        "dataset": ev.dataset,
        "process": cfg.process.name,
        "partition": run.partition.kind,
        "blocks": run.num_blocks,
        "train_steps": cfg.train.block_steps or cfg.train.steps,
        "trained_block_steps": block_steps,
        "train_seconds": round(train_seconds, 3),
        "t0": s.t0 if s is not None else run.partition.t0,
        "run_t0": run.partition.t0,
        "convention": bits.convention if bits else None,
        "dequantization": bits.dequantization if bits else None,
        "convention_label": label,
        "bpd": _finite(bits.bpd) if bits else None,
        "bpd_stderr": _finite(bits.stderr) if bits else None,
        "bpd_trivial": bits.trivial if bits else None,
        "levels": bits.levels if bits else None,
        "dims": bits.dims if bits else None,
        "dequantized": s.dequantize if bits and s is not None else None,
        "dequantization_scale": bits.noise_scale if bits else None,
        "dequantization_log_q": log_q,
        "log_scale_per_dim": bits.log_scale_per_dim if bits else None,
        "nll": _finite(r.nll),
        "stderr": _finite(r.stderr),
        "n": r.n,
        "entropy": ev.entropy,
        "gap": _finite(gap),
        "finite": r.finite,
        "seconds": round(r.seconds, 3),
        "seconds_per_point": r.seconds / r.n if r.n else None,
        "peak_memory_mb": round(peak_memory_mb, 1) if peak_memory_mb is not None else None,
        "memory_kind": memory_kind,
        "solver": solver.method,
        "steps": _steps(solver),
        "rtol": solver.rtol if adaptive else None,
        "atol": solver.atol if adaptive else None,
        "grid": _grid(solver),
        "trace": trace,
        "probes": r.probes if hutch else None,
        "probe_redraw": r.redraw if hutch else None,
        "grid_field": ev.grid_field,
        "batch_size": batch_size,
        "test_seed": test_seed,
        "probe_seed": probe_seed if hutch else None,
        "device": device,
        "dtype": dtype,
        "host": socket.gethostname(),
        "psm_version": __version__,
    }


def evaluation_key(
    run: Run,
    settings: EvalSettings,
    *,
    n: int,
    test_seed: int,
    probe_seed: int = 0,
    batch_size: int,
    device: str,
    dtype: str,
    grid_field: str = "constant",
) -> dict[str, Any]:
    """The :data:`IDENTITY` fields :func:`nll_record` would write for this evaluation of
    ``run``, known before it runs (what a record is looked up by, :func:`find_record`)."""
    solver = settings.solver
    adaptive = not solver.fixed_step
    hutch = settings.trace == "hutchinson"
    image = settings.convention is not None
    key = {
        "config_hash": run.hash,
        "train_steps": _train_steps(run),
        "t0": settings.t0,
        "convention": settings.convention if image else None,
        "dequantization": settings.dequantization if image and settings.dequantize else None,
        "n": n,
        "solver": solver.method,
        "steps": _steps(solver),
        "rtol": solver.rtol if adaptive else None,
        "atol": solver.atol if adaptive else None,
        "grid": _grid(solver),
        "trace": settings.trace,
        "probes": settings.probes if hutch else None,
        "probe_redraw": settings.redraw if hutch else None,
        "grid_field": grid_field if run.partition.kind == "grid" else None,
        "batch_size": batch_size,
        "test_seed": test_seed,
        "probe_seed": probe_seed if hutch else None,
        "device": device,
        "dtype": dtype,
    }
    assert tuple(key) == IDENTITY
    return key


def read_records(run_path: str | Path) -> list[dict[str, Any]]:
    """Every record in ``<run_path>/nll.jsonl``, oldest first (none if the file is missing;
    a line that is not a JSON object is skipped)."""
    try:
        lines = (Path(run_path) / NLL_LOG).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def identity_value(rec: Mapping[str, Any], field: str) -> Any:
    """A record's :data:`IDENTITY` field; a psm-convention record made before
    ``dequantization`` was recorded was uniformly dequantized (the only way then)."""
    if field == "dequantization" and field not in rec and rec.get("convention") == "psm":
        return "uniform"
    return rec.get(field)


def find_record(
    run_path: str | Path, key: Mapping[str, Any], *, trained_block_steps: int | None = None
) -> dict[str, Any] | None:
    """The newest record in ``<run_path>/nll.jsonl`` whose :data:`IDENTITY` fields equal
    ``key``'s (and, if given, scored after ``trained_block_steps`` block-steps), or None."""
    for rec in reversed(read_records(run_path)):
        same = all(identity_value(rec, k) == key[k] for k in IDENTITY)
        if same and trained_block_steps in (None, rec.get("trained_block_steps")):
            return rec
    return None


def append_record(run_path: str | Path, record: Mapping[str, Any]) -> Path:
    """Append one record to ``<run_path>/nll.jsonl``; returns the file."""
    path = Path(run_path) / NLL_LOG
    append_line(path, json.dumps(dict(record), allow_nan=False))
    return path
