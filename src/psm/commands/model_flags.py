"""Flags and helpers shared by the commands that load a trained model (nll, sample, plot)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..errors import PSMError

if TYPE_CHECKING:  # torch is imported when a command runs, not when `psm` parses its flags
    import torch

    from ..core.ode import SolverSettings

DTYPES: tuple[str, ...] = ("float32", "float64")
DEFAULT_TOL = 1e-5  # SolverSettings.rtol/atol and eval.rtol/atol (tested)
SOLVER_CHOICES: tuple[str, ...] = ("rk4", "euler", "dopri5")  # psm.core.ode.SOLVER_NAMES (tested)
GRID_CHOICES: tuple[str, ...] = ("uniform", "log")  # psm.core.ode.GRIDS (tested)
GRID_FIELD_CHOICES: tuple[str, ...] = ("constant", "linear")  # psm.core.model.GRID_FIELDS (tested)


def parse_steps(text: str) -> int | tuple[int, ...]:
    """``"1000"`` → 1000 (a budget over ``[t0, 1]``); ``"100,900"`` → steps per block id."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected N or N,N,... (per block), got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"steps must be >= 1, got {text!r}")
    return values[0] if len(values) == 1 and "," not in text else values


def add_ode_arguments(p: argparse.ArgumentParser, *, steps_default: str) -> None:
    """``--steps``, ``--solver``, ``--rtol``, ``--atol``."""
    p.add_argument(
        "--steps",
        type=parse_steps,
        metavar="N[,N...]",
        help=f"fixed-step budget over [t0, 1], or steps per block (default: {steps_default})",
    )
    p.add_argument(
        "--solver",
        choices=SOLVER_CHOICES,
        help="ODE solver (default: the run's eval.solver)",
    )
    p.add_argument("--rtol", type=float, help=f"dopri5 relative tolerance (default {DEFAULT_TOL})")
    p.add_argument("--atol", type=float, help=f"dopri5 absolute tolerance (default {DEFAULT_TOL})")


def add_grid_argument(p: argparse.ArgumentParser) -> None:
    """``--grid uniform|log`` (``args.step_grid``): how a fixed-step solver places its steps,
    read by :func:`ode_settings` (``psm plot`` has another ``--grid``, the heat map's)."""
    p.add_argument(
        "--grid",
        dest="step_grid",
        choices=GRID_CHOICES,
        help="fixed-step solvers: steps evenly spaced in t (uniform, the default) or in log t "
        "(log: short steps near t0, where image models' fields change fastest)",
    )


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--grid-field``, ``--device``, ``--dtype``, ``--threads``, ``--no-progress``."""
    p.add_argument(
        "--grid-field",
        choices=GRID_FIELD_CHOICES,
        help="DPSM runs: field between grid points, constant (paper) or linear (default constant)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="evaluation dtype")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's, one per core; on a busy machine 1 can be "
        "much faster)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (refusing values < 1)."""
    if args.threads is None:
        return
    check_positive(threads=args.threads)
    import torch

    torch.set_num_threads(args.threads)


def ode_settings(
    args: argparse.Namespace, default: SolverSettings, *, blocks: int
) -> SolverSettings:
    """The solver from the flags over a default (a run's ``eval.solver_settings()``), checked.

    Args:
        args: the parsed flags (``solver``, ``steps``, ``rtol``, ``atol``, and ``step_grid``
            where the command has it: :func:`add_grid_argument`).
        default: the solver the flags override, field by field.
        blocks: the run's number of blocks (a per-block ``--steps`` list must match it).

    Raises:
        PSMError: per-block steps of the wrong length; tolerances given for a fixed-step
            solver, or not > 0; a log grid for an adaptive solver.
    """
    from dataclasses import replace

    from ..core.ode import SOLVERS

    method = args.solver or default.method
    steps = args.steps if args.steps is not None else default.steps
    if not isinstance(steps, int) and len(steps) != blocks:
        raise PSMError(f"--steps: {len(steps)} per-block values for a run of {blocks} blocks")
    flag_grid = getattr(args, "step_grid", None)
    grid = flag_grid or default.grid
    if not SOLVERS[method].fixed_step:
        if flag_grid not in (None, "uniform"):
            raise PSMError(f"--grid applies to fixed-step solvers only (solver is {method})")
        grid = "uniform"  # an adaptive solver places its own steps
    settings = replace(default, method=method, steps=steps, grid=grid)
    for flag in ("rtol", "atol"):
        value = getattr(args, flag)
        if value is None:
            continue
        if settings.fixed_step:
            raise PSMError(f"--{flag} applies to adaptive solvers only (solver is {method})")
        if not value > 0:
            raise PSMError(f"--{flag} must be > 0, got {value}")
    tolerances = {k: getattr(args, k) for k in ("rtol", "atol") if getattr(args, k) is not None}
    return replace(settings, **tolerances)


def dtype_of(name: str) -> torch.dtype:
    """``--dtype`` name → torch dtype."""
    import torch

    return getattr(torch, name)


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` → cuda if available else cpu; refuse a missing CUDA."""
    from ..core.device import resolve_device as resolve

    try:
        return resolve(name)
    except PSMError as e:
        raise PSMError(f"--device {name}: {e}") from None


def grid_field_for(args: argparse.Namespace, run) -> str:
    """The DPSM field to use; a warning when ``--grid-field`` is given for a TPSM/SA run."""
    if args.grid_field and run.partition.kind != "grid":
        warn("--grid-field applies to DPSM (grid) runs only; ignored")
    return args.grid_field or "constant"


def check_positive(**values: int | None) -> None:
    """Refuse flags (given as ``name=value``, ``_`` for ``-``) that are set and < 1."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise PSMError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"psm: warning: {message}", file=sys.stderr)


def reset_peak_memory(device: torch.device) -> None:
    """Start a peak-memory measurement: CUDA's peak counter is reset; a process's peak RSS
    cannot be reset (see :func:`peak_memory`)."""
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float | None, str]:
    """Peak memory in MB, and what was measured.

    On CUDA: ``torch.cuda.max_memory_allocated`` since :func:`reset_peak_memory` (the tensors
    of this evaluation, like the paper's tables 7-9). On the CPU: the process's peak resident
    set size (``getrusage``), a high-water mark of the whole process since it started (the
    Python interpreter, torch and the model included); None where the platform has no
    ``resource`` module.
    """
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, "unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB on Linux
    return rss / scale, "process peak RSS"


def format_cost(seconds: float, n: int, unit: str, memory_mb: float | None, kind: str) -> str:
    """``"12.3 s (0.192 s per image), peak memory 512 MB (process peak RSS)"``."""
    per = seconds / n if n else float("nan")
    text = f"{seconds:.1f} s ({per:.3g} s per {unit})"
    if memory_mb is not None:
        text += f", peak memory {memory_mb:.0f} MB ({kind})"
    return text
