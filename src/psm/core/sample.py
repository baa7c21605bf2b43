"""Generation through the blocks: probability-flow ODE (eqs. 3 and 5) and reverse SDE (eq. 7).

Both start from noise at t = 1 and run down to the floor t0, block by block, each block's net
used only on its own sub-interval:

* ODE: any solver of :mod:`psm.core.ode`. For DPSM with the piecewise-constant field, Euler with one
  step per grid cell (``steps`` = number of grid points) is exactly the paper's eq. 5,
  ``x(t_i) = x(t_{i+1}) - ε f_{i+1}(x(t_{i+1}))`` with net i on step i.
* SDE: Euler–Maruyama on ``dx = [(α'/α) x - g² ∇log p_t(x)] dt + g dW̄`` (eq. 7 for VP:
  ``-b(t) [½ x + s] dt + √b dW̄``), with :meth:`Process.reverse_sde` giving drift and g. It is
  always Euler–Maruyama: of a :class:`~psm.core.ode.SolverSettings` it takes ``steps`` only (a
  fixed-step method's name, rk4 or euler, changes nothing; its tolerances are unused), and an
  adaptive solver (dopri5), which has no step budget, is refused.

Every random draw comes from a generator passed in, so a seed fixes the samples.
:func:`sample_path` also keeps the samples' states at block boundaries (the strips of
``psm plot`` on image runs); :func:`boundary_times` lists those boundaries.

Everything is batched over any point shape (``[B, *D]``: 2D points or ``[B, C, H, W]`` images)
and reports to a :class:`~psm.core.progress.Progress` at every solver step (the bar itself is
drawn by the caller). Fixed-step budgets are allocated to blocks by length or given per block
(``(100, 900)``: the paper's TPSM0 on images); DPSM with the constant field and one Euler step
per grid cell is eq. 5 (appendix H: 1k steps to generate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .model import BlockModel
from .ode import PAPER_SOLVER, SolverSettings, StepHook, probability_flow, solve_units, steps_for
from .progress import Progress, check_progress

Method = Literal["ode", "sde"]
METHODS: tuple[str, ...] = ("ode", "sde")


def prior_sample(
    n: int,
    shape: Sequence[int],
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> Tensor:
    """``n`` draws from the prior ``N(0, I)`` at t = 1, ``[n, *shape]``.

    Args:
        n: number of points.
        shape: shape of one point.
        generator: the random source; the draw happens on its device.
        dtype: result dtype.
        device: result device (default: the generator's).
    """
    z = torch.randn((n, *shape), generator=generator, device=generator.device, dtype=dtype)
    return z if device is None else z.to(device)


def sample_ode(
    model: BlockModel,
    x1: Tensor,
    *,
    solver: SolverSettings = PAPER_SOLVER,
    on_step: StepHook | None = None,
) -> Tensor:
    """Carry noise ``x1`` at t = 1 to data at t0 along the probability-flow ODE (eq. 3 per block).

    Args:
        model: the assembled blocks.
        x1: starting points at t = 1, ``[B, *D]``.
        solver: the ODE solver and its steps (a budget over ``[t0, 1]`` or per block id).
        on_step: hook ``(t, (x,))`` after each step (each block for adaptive solvers).

    Returns:
        Samples ``[B, *D]`` at t0.
    """
    with torch.no_grad():
        return probability_flow(model, x1, direction="to_data", solver=solver, on_step=on_step)


def sample_sde(
    model: BlockModel,
    x1: Tensor,
    *,
    generator: torch.Generator,
    steps: int | Sequence[int] = 1000,
    on_step: StepHook | None = None,
) -> Tensor:
    """Carry noise ``x1`` at t = 1 to data at t0 along the reverse SDE (eq. 7), Euler–Maruyama.

    Each step from t to ``t + h`` (``h < 0``) is
    ``x ← x + drift(x, t) h + g(t) √|h| z`` with ``z ~ N(0, I)`` from ``generator``
    (for DPSM with the constant field, drift and g are taken at the cell's grid time).

    Args:
        model: the assembled blocks.
        x1: starting points at t = 1, ``[B, *D]``.
        generator: source of the Brownian increments, on ``x1``'s device.
        steps: step budget over ``[t0, 1]`` (split by block length) or steps per block id.
        on_step: hook ``(t, (x,))`` after each step.

    Returns:
        Samples ``[B, *D]`` at t0.
    """
    segs = model.segments()
    counts = steps_for(segs, steps)
    x = x1
    with torch.no_grad():
        for seg, n in zip(reversed(segs), reversed(counts)):
            h = (seg.t_lo - seg.t_hi) / n
            for k in range(n):
                t = torch.tensor(seg.t_hi + k * h, dtype=x.dtype, device=x.device)
                drift, g = model.reverse_sde(x, t, seg.block)
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                g = g.reshape(g.shape + (1,) * (x.dim() - g.dim()))
                x = x + drift * h + g * math.sqrt(-h) * z
                if on_step is not None:
                    on_step(seg.t_hi + (k + 1) * h if k + 1 < n else seg.t_lo, (x,))
    return x


def boundary_times(model: BlockModel) -> list[float]:
    """The block boundaries a sample passes from noise to data: ``1``, each block's lower end,
    down to ``t0`` (decreasing; K + 1 values for K blocks whose segments are all above t0)."""
    segs = model.segments()
    return [segs[-1].t_hi] + [s.t_lo for s in reversed(segs)]


def pick_times(times: Sequence[float], most: int) -> list[float]:
    """At most ``most`` (>= 2) of ``times``, evenly spaced by index, first and last kept."""
    if most < 2:
        raise ValueError(f"most must be >= 2, got {most}")
    if len(times) <= most:
        return list(times)
    idx = sorted({round(i * (len(times) - 1) / (most - 1)) for i in range(most)})
    return [times[i] for i in idx]


def sample(
    model: BlockModel,
    n: int,
    *,
    generator: torch.Generator,
    method: Method = "ode",
    solver: SolverSettings = PAPER_SOLVER,
    batch_size: int = 10000,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Draw ``n`` samples from the model, in batches.

    Noise and (for the SDE) Brownian increments come from ``generator``, batch after batch, so
    the result depends only on the generator's seed and the batch size.

    Args:
        model: the assembled blocks.
        n: number of samples.
        generator: the random source; draws happen on its device.
        method: ``"ode"`` (probability flow) or ``"sde"`` (reverse SDE, Euler–Maruyama).
        solver: ODE solver and steps; the SDE is Euler–Maruyama whatever the fixed-step
            method and reads ``solver.steps`` only (an adaptive solver is refused).
        batch_size: samples per solve.
        shape: shape of one sample (default: ``model.shape``).
        dtype: sample dtype (the blocks' dtype).
        device: where to integrate (default: the generator's device).
        progress: told the total number of steps, each batch and every step (see
            :mod:`psm.core.progress`); None: no report.

    Returns:
        ``[n, *shape]`` samples at t0, on ``device``.

    Raises:
        ValueError: the SDE with an adaptive solver; see :func:`sample_path` for the rest.
    """
    x, _ = sample_path(
        model, n, generator=generator, method=method, solver=solver, batch_size=batch_size,
        shape=shape, dtype=dtype, device=device, progress=progress,
    )  # fmt: skip
    return x


def sample_path(
    model: BlockModel,
    n: int,
    *,
    generator: torch.Generator,
    at: Sequence[float] = (),
    method: Method = "ode",
    solver: SolverSettings = PAPER_SOLVER,
    batch_size: int = 10000,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw ``n`` samples, keeping their states at some block boundaries on the way.

    The same draws as :func:`sample` with the same arguments (the states are read off the
    solve, which is not changed).

    Args:
        at: times to keep, each one of :func:`boundary_times` (1, a block boundary, or t0):
            the solvers land exactly on them.
        model, n, generator, method, solver, batch_size, shape, dtype, device, progress: as in
            :func:`sample`.

    Returns:
        ``(samples [n, *shape], states [len(at), n, *shape])``, the states in the order of
        ``at``, on ``device``.

    Raises:
        ValueError: a time in ``at`` that is not a block boundary; the SDE with an adaptive
            solver.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (choose from ode, sde)")
    if method == "sde" and not solver.fixed_step:
        raise ValueError(
            f"the reverse SDE is Euler–Maruyama with a fixed step budget; {solver.method} is "
            f"adaptive (pass a fixed-step solver's steps, e.g. SolverSettings('euler', 1000))"
        )
    progress = check_progress(progress)
    shape = tuple(shape) if shape is not None else model.shape
    if shape is None:
        raise ValueError("the model does not know its sample shape: pass shape=")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wanted = [float(t) for t in at]
    bounds = boundary_times(model)
    bad = [t for t in wanted if t not in bounds]
    if bad:
        raise ValueError(f"times {bad} are not block boundaries ({bounds[:5]}...)")
    device = torch.device(device) if device is not None else generator.device
    if method == "sde" and generator.device != device:
        raise ValueError("the SDE sampler draws on the generator's device: pass a generator there")
    out: list[Tensor] = []
    kept: list[list[Tensor]] = [[] for _ in wanted]
    batches = math.ceil(n / batch_size)
    if method == "sde":
        units = sum(steps_for(model.segments(), solver.steps))
    else:
        units = solve_units(model.segments(), solver)
    if progress is not None:
        progress.start(batches * units)
    for j, i in enumerate(range(0, n, batch_size)):
        if progress is not None:
            progress.note(f"batch {j + 1}/{batches}")
        m = min(batch_size, n - i)
        x1 = prior_sample(m, shape, generator=generator, dtype=dtype, device=device)
        here: dict[float, Tensor] = {bounds[0]: x1}

        def tick(t: float, y: tuple[Tensor, ...], here=here) -> None:
            if progress is not None:
                progress.advance(1)
            if t in wanted:
                here[t] = y[0]

        if method == "ode":
            x = sample_ode(model, x1, solver=solver, on_step=tick)
        else:
            x = sample_sde(model, x1, generator=generator, steps=solver.steps, on_step=tick)
        out.append(x)
        for k, t in enumerate(wanted):
            kept[k].append(here[t])
    if not out:
        empty = torch.empty((0, *shape), dtype=dtype, device=device)
        return empty, empty.new_empty((len(wanted), 0, *shape))
    states = (
        torch.stack([torch.cat(k) for k in kept])
        if wanted
        else torch.empty((0, n, *shape), dtype=dtype, device=device)
    )
    return torch.cat(out), states
