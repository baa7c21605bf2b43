"""Probability-flow ODE integration through the blocks (paper eq. 30; eqs. 3-6 per block).

The solvers are pure functions of a *dynamics* ``f(t, y) -> dy/dt`` over a state ``y`` that is a
tuple of tensors, so one integrator carries both the plain state ``(x,)`` (sampling) and the
augmented state ``(x, Δlogp)`` of the instantaneous change of variables (likelihood, eq. 20).

A model is integrated block by block: block i's field is used only on its own sub-interval
``[t_i, t_{i+1}]`` (with the floor t0), each block solved on its own (eq. 3 for generation, the
sum over blocks in eq. 4 for likelihood). Fixed-step solvers split a total step budget over the
blocks in proportion to their lengths (at least one step each) unless steps are given per
block; the adaptive solver (dopri5 through :func:`torchdiffeq.odeint`) restarts at each block
boundary, where the field may jump.

Directions: ``"to_noise"`` runs ``t0 → 1`` (data to noise, likelihood); ``"to_data"`` runs
``1 → t0`` (noise to data, generation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor
from torchdiffeq import odeint

from .model import BlockModel, Segment

State = tuple[Tensor, ...]
Dynamics = Callable[[Tensor, State], State]
"""``f(t, y) -> dy/dt``: ``t`` a 0-dim tensor, ``y`` a tuple of tensors (output: same shapes)."""

BlockDynamics = Callable[[int, Tensor, State], State]
"""``f(block, t, y) -> dy/dt``: the dynamics inside block ``block``."""

StepHook = Callable[[float, State], None]
"""Called as ``hook(t, y)`` after each step (fixed-step solvers) or each block (dopri5)."""

Solver = Literal["euler", "rk4", "dopri5"]
SOLVERS: tuple[str, ...] = ("euler", "rk4", "dopri5")
Direction = Literal["to_noise", "to_data"]


# ---------------------------------------------------------------------- single steps
def _axpy(y: State, h: float, *ks: tuple[float, State]) -> State:
    """``y + h Σ_j c_j k_j`` for tuple states."""
    out = []
    for i, yi in enumerate(y):
        acc = yi
        for c, k in ks:
            acc = acc + (h * c) * k[i]
        out.append(acc)
    return tuple(out)


def euler_step(f: Dynamics, t: Tensor, h: float, y: State) -> State:
    """One explicit Euler step ``y + h f(t, y)`` (eq. 5 is this step with net i on step i).

    Args:
        f: the dynamics.
        t: the step's start time, a 0-dim tensor.
        h: the step (negative when integrating backwards in time).
        y: the state at ``t``.

    Returns:
        The state at ``t + h``.
    """
    return _axpy(y, h, (1.0, f(t, y)))


def rk4_step(f: Dynamics, t: Tensor, h: float, y: State) -> State:
    """One classical fourth-order Runge–Kutta step.

    Args and return as in :func:`euler_step`.
    """
    k1 = f(t, y)
    k2 = f(t + 0.5 * h, _axpy(y, 0.5 * h, (1.0, k1)))
    k3 = f(t + 0.5 * h, _axpy(y, 0.5 * h, (1.0, k2)))
    k4 = f(t + h, _axpy(y, h, (1.0, k3)))
    return _axpy(y, h / 6.0, (1.0, k1), (2.0, k2), (2.0, k3), (1.0, k4))


_STEPPERS = {"euler": euler_step, "rk4": rk4_step}


# ---------------------------------------------------------------------- one interval
def integrate_fixed(
    f: Dynamics,
    y0: State,
    t_start: float,
    t_end: float,
    steps: int,
    *,
    method: Literal["euler", "rk4"] = "rk4",
    on_step: StepHook | None = None,
) -> State:
    """Integrate ``dy/dt = f(t, y)`` from ``t_start`` to ``t_end`` with ``steps`` equal steps.

    Args:
        f: the dynamics.
        y0: the state at ``t_start``.
        t_start: start time.
        t_end: end time (may be below ``t_start``).
        steps: number of steps, >= 1.
        method: ``"euler"`` or ``"rk4"``.
        on_step: hook called after each step.

    Returns:
        The state at ``t_end``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if method not in _STEPPERS:
        raise ValueError(f"unknown fixed-step method {method!r} (choose from euler, rk4)")
    step = _STEPPERS[method]
    ref = y0[0]
    h = (t_end - t_start) / steps
    y = y0
    for k in range(steps):
        t = torch.tensor(t_start + k * h, dtype=ref.dtype, device=ref.device)
        y = step(f, t, h, y)
        if on_step is not None:
            on_step(t_start + (k + 1) * h if k + 1 < steps else t_end, y)
    return y


def integrate_adaptive(
    f: Dynamics,
    y0: State,
    t_start: float,
    t_end: float,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> State:
    """Integrate ``dy/dt = f(t, y)`` with adaptive dopri5 (:func:`torchdiffeq.odeint`).

    Args:
        f: the dynamics.
        y0: the state at ``t_start``.
        t_start: start time.
        t_end: end time (may be below ``t_start``).
        rtol: relative tolerance.
        atol: absolute tolerance.

    Returns:
        The state at ``t_end``.
    """
    ref = y0[0]
    ts = torch.tensor([t_start, t_end], dtype=ref.dtype, device=ref.device)
    sol = odeint(f, tuple(y0), ts, rtol=rtol, atol=atol, method="dopri5")
    return tuple(s[-1] for s in sol)


# ---------------------------------------------------------------------- through the blocks
def allocate_steps(lengths: Sequence[float], total: int) -> list[int]:
    """Split a total step budget over intervals in proportion to their lengths.

    Largest-remainder rounding, at least one step per interval (so the sum exceeds ``total``
    only when ``total`` is smaller than the number of intervals).

    Args:
        lengths: interval lengths, all > 0.
        total: the budget.

    Returns:
        Steps per interval, in the order of ``lengths``.
    """
    if total < 1:
        raise ValueError(f"steps must be >= 1, got {total}")
    span = float(sum(lengths))
    raw = [total * length / span for length in lengths]
    steps = [max(1, math.floor(r)) for r in raw]
    left = total - sum(steps)
    if left > 0:
        order = sorted(range(len(raw)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
        for i in order[:left]:
            steps[i] += 1
    return steps


def steps_for(segments: Sequence[Segment], steps: int | Sequence[int]) -> list[int]:
    """Steps per segment: a total budget split by length, or given per block id.

    Args:
        segments: the segments to integrate.
        steps: a total (split with :func:`allocate_steps`) or a sequence indexed by block id
            (e.g. ``[100, 900]`` for the paper's two image blocks ``[0, 0.1], [0.1, 1]``).

    Returns:
        Steps for each segment, in the order of ``segments``.
    """
    if isinstance(steps, int):
        return allocate_steps([s.length for s in segments], steps)
    per_block = list(steps)
    need = max(s.block for s in segments) + 1
    if len(per_block) < need:
        raise ValueError(f"steps per block: {len(per_block)} values for {need} blocks")
    out = [int(per_block[s.block]) for s in segments]
    if any(n < 1 for n in out):
        raise ValueError(f"steps per block must be >= 1, got {out}")
    return out


def integrate_blocks(
    dynamics: BlockDynamics,
    y0: State,
    segments: Sequence[Segment],
    *,
    direction: Direction,
    solver: Solver = "rk4",
    steps: int | Sequence[int] = 1000,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    on_step: StepHook | None = None,
) -> State:
    """Integrate block by block, each block's dynamics over its own segment.

    Args:
        dynamics: ``f(block, t, y)``.
        y0: the state at the start (``t0`` for ``"to_noise"``, 1 for ``"to_data"``).
        segments: the blocks' segments in increasing time (:meth:`BlockModel.segments`).
        direction: ``"to_noise"`` (t0 → 1) or ``"to_data"`` (1 → t0).
        solver: ``"euler"``, ``"rk4"`` or ``"dopri5"``.
        steps: fixed-step solvers: a total budget or steps per block id (see :func:`steps_for`).
        rtol: dopri5 relative tolerance.
        atol: dopri5 absolute tolerance.
        on_step: hook called after each step (each block for dopri5).

    Returns:
        The state at the far end.
    """
    if direction not in ("to_noise", "to_data"):
        raise ValueError(f"unknown direction {direction!r} (choose from to_noise, to_data)")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r} (choose from {', '.join(SOLVERS)})")
    segs = list(segments)
    counts = steps_for(segs, steps) if solver != "dopri5" else [0] * len(segs)
    order = range(len(segs)) if direction == "to_noise" else range(len(segs) - 1, -1, -1)
    y = tuple(y0)
    for i in order:
        seg = segs[i]
        a, b = (seg.t_lo, seg.t_hi) if direction == "to_noise" else (seg.t_hi, seg.t_lo)

        def f(t: Tensor, y: State, _block: int = seg.block) -> State:
            return dynamics(_block, t, y)

        if solver == "dopri5":
            y = integrate_adaptive(f, y, a, b, rtol=rtol, atol=atol)
            if on_step is not None:
                on_step(b, y)
        else:
            y = integrate_fixed(f, y, a, b, counts[i], method=solver, on_step=on_step)
    return y


def probability_flow(
    model: BlockModel,
    x: Tensor,
    *,
    direction: Direction,
    solver: Solver = "rk4",
    steps: int | Sequence[int] = 1000,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    on_step: StepHook | None = None,
) -> Tensor:
    """Carry points along the probability-flow ODE ``dx/dt = f(x, t)`` (eq. 30) through a model.

    Args:
        model: the assembled blocks.
        x: ``[B, *D]`` at ``t0`` (``"to_noise"``) or at 1 (``"to_data"``).
        direction, solver, steps, rtol, atol, on_step: as in :func:`integrate_blocks`.

    Returns:
        ``[B, *D]`` at the far end.
    """

    def dynamics(block: int, t: Tensor, y: State) -> State:
        return (model.field(y[0], t, block),)

    (out,) = integrate_blocks(
        dynamics, (x,), model.segments(), direction=direction, solver=solver, steps=steps,
        rtol=rtol, atol=atol, on_step=on_step,
    )  # fmt: skip
    return out
