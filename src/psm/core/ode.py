"""Probability-flow ODE integration through the blocks (paper eq. 30; eqs. 3-6 per block).

The solvers are pure functions of a *dynamics* ``f(t, y) -> dy/dt`` over a state ``y`` that is a
tuple of tensors, so one integrator carries both the plain state ``(x,)`` (sampling) and the
augmented state ``(x, Δlogp)`` of the instantaneous change of variables (likelihood, eq. 20).

A model is integrated block by block: block i's field is used only on its own sub-interval
``[t_i, t_{i+1}]`` (with the floor t0), each block solved on its own (eq. 3 for generation, the
sum over blocks in eq. 4 for likelihood). Fixed-step solvers split a total step budget over the
blocks in proportion to their lengths (at least one step each) unless steps are given per
block, and space the steps of each block evenly in t (``grid="uniform"``, the default) or
evenly in log t (``grid="log"``: geometric, short steps near t0 where the field of image models
changes fastest, long ones near 1; the budget is then split by the blocks' lengths in log t, so
the steps of all blocks make one geometric grid over ``[t0, 1]``, to rounding). The adaptive
solver (dopri5 through :func:`torchdiffeq.odeint`) restarts at each block boundary, where the
field may jump, and is made to land exactly on the block's end (its ``step_t`` option) and to
start with a step inside the block, so that it never evaluates a block's field outside the
block's own segment (by default dopri5 steps past the end and interpolates back).

Solver settings travel as one :class:`SolverSettings` value; :data:`SOLVERS` lists the methods,
so a new solver is one step (or one torchdiffeq method name) and one registry entry.

Directions: ``"to_noise"`` runs ``t0 → 1`` (data to noise, likelihood); ``"to_data"`` runs
``1 → t0`` (noise to data, generation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import Tensor
from torchdiffeq import odeint

from .partition import Segment

if TYPE_CHECKING:
    from .model import BlockModel

State = tuple[Tensor, ...]
Dynamics = Callable[[Tensor, State], State]
"""``f(t, y) -> dy/dt``: ``t`` a 0-dim tensor, ``y`` a tuple of tensors (output: same shapes)."""

BlockDynamics = Callable[[int, Tensor, State], State]
"""``f(block, t, y) -> dy/dt``: the dynamics inside block ``block``."""

StepHook = Callable[[float, State], None]
"""Called as ``hook(t, y)`` after each step (fixed-step solvers) or each block (adaptive)."""

Direction = Literal["to_noise", "to_data"]
DIRECTIONS: tuple[str, ...] = ("to_noise", "to_data")

Grid = Literal["uniform", "log"]
GRIDS: tuple[str, ...] = ("uniform", "log")
"""How fixed-step solvers place their steps in each block: evenly in t, or evenly in log t."""


# ---------------------------------------------------------------------- single steps
def _linear_combination(y: State, h: float, *terms: tuple[float, State]) -> State:
    """``y + h Σ_j c_j k_j`` for tuple states, ``terms = ((c_1, k_1), ...)``."""
    out = []
    for i, yi in enumerate(y):
        acc = yi
        for c, k in terms:
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
    return _linear_combination(y, h, (1.0, f(t, y)))


def rk4_step(f: Dynamics, t: Tensor, h: float, y: State) -> State:
    """One classical fourth-order Runge–Kutta step.

    Args and return as in :func:`euler_step`.
    """
    k1 = f(t, y)
    k2 = f(t + 0.5 * h, _linear_combination(y, 0.5 * h, (1.0, k1)))
    k3 = f(t + 0.5 * h, _linear_combination(y, 0.5 * h, (1.0, k2)))
    k4 = f(t + h, _linear_combination(y, h, (1.0, k3)))
    return _linear_combination(y, h / 6.0, (1.0, k1), (2.0, k2), (2.0, k3), (1.0, k4))


# ---------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SolverSettings:
    """How to integrate: the method and its step budget or tolerances.

    Attributes:
        method: a key of :data:`SOLVERS` (``"rk4"``, ``"euler"``, ``"dopri5"``).
        steps: fixed-step methods: a budget over ``[t0, 1]`` split by block length, or steps
            per block id (e.g. ``(100, 900)`` for the paper's TPSM0 images); unused by adaptive
            methods.
        rtol: adaptive methods: relative tolerance.
        atol: adaptive methods: absolute tolerance.
        grid: fixed-step methods: steps evenly spaced in t (``"uniform"``) or in log t
            (``"log"``, geometric; a total budget is then split by the blocks' lengths in
            log t). Adaptive methods take only ``"uniform"`` (they place their own steps).
    """

    method: str = "rk4"
    steps: int | tuple[int, ...] = 1000
    rtol: float = 1e-5
    atol: float = 1e-5
    grid: str = "uniform"

    def __post_init__(self) -> None:
        if self.method not in SOLVERS:
            raise ValueError(f"unknown solver {self.method!r} (choose from {', '.join(SOLVERS)})")
        steps = (self.steps,) if isinstance(self.steps, int) else tuple(self.steps)
        if not steps or any(int(n) < 1 for n in steps):
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not isinstance(self.steps, int):
            object.__setattr__(self, "steps", tuple(int(n) for n in self.steps))
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError(f"tolerances must be > 0, got rtol={self.rtol}, atol={self.atol}")
        if self.grid not in GRIDS:
            raise ValueError(f"unknown grid {self.grid!r} (choose from {', '.join(GRIDS)})")
        if self.grid != "uniform" and not self.fixed_step:
            raise ValueError(f"a {self.grid} grid applies to fixed-step solvers, not {self.method}")

    @property
    def fixed_step(self) -> bool:
        """Whether the method takes a fixed number of steps (``steps`` applies)."""
        return SOLVERS[self.method].fixed_step

    def describe(self) -> str:
        """``"rk4 1000 steps"``, ``"rk4 steps 100,900"``, ``"rk4 250 steps, log grid"`` or
        ``"dopri5 rtol 1e-05"``."""
        if not self.fixed_step:
            return f"{self.method} rtol {self.rtol:g}"
        grid = "" if self.grid == "uniform" else f", {self.grid} grid"
        if isinstance(self.steps, int):
            return f"{self.method} {self.steps} steps{grid}"
        return f"{self.method} steps {','.join(map(str, self.steps))}{grid}"


# ---------------------------------------------------------------------- one interval
class SegmentSolver(Protocol):
    """Integrates ``dy/dt = f(t, y)`` over one segment (one block)."""

    fixed_step: bool

    def __call__(
        self, f: Dynamics, y0: State, t_start: float, t_end: float, *, steps: int,
        settings: SolverSettings, on_step: StepHook | None,
    ) -> State: ...  # fmt: skip


@dataclass(frozen=True)
class FixedStep:
    """``steps`` steps of a one-step method (:func:`euler_step`, :func:`rk4_step`), placed as
    ``settings.grid`` says."""

    step: Callable[[Dynamics, Tensor, float, State], State]
    fixed_step: bool = True

    def __call__(
        self, f: Dynamics, y0: State, t_start: float, t_end: float, *, steps: int,
        settings: SolverSettings, on_step: StepHook | None,
    ) -> State:  # fmt: skip
        return integrate_fixed(
            f, y0, t_start, t_end, steps, step=self.step, on_step=on_step, grid=settings.grid
        )


@dataclass(frozen=True)
class Adaptive:
    """An adaptive torchdiffeq method (e.g. ``"dopri5"``), kept inside the segment."""

    method: str
    fixed_step: bool = False

    def __call__(
        self, f: Dynamics, y0: State, t_start: float, t_end: float, *, steps: int,
        settings: SolverSettings, on_step: StepHook | None,
    ) -> State:  # fmt: skip
        y = integrate_adaptive(
            f, y0, t_start, t_end, method=self.method, rtol=settings.rtol, atol=settings.atol
        )
        if on_step is not None:
            on_step(t_end, y)
        return y


SOLVERS: dict[str, SegmentSolver] = {
    "rk4": FixedStep(rk4_step),
    "euler": FixedStep(euler_step),
    "dopri5": Adaptive("dopri5"),
}
"""The solvers by name: one entry per method."""

SOLVER_NAMES: tuple[str, ...] = tuple(SOLVERS)

PAPER_SOLVER = SolverSettings("rk4", 1000)
"""The paper's likelihood solver: RK4 with 1000 steps over ``[t0, 1]`` (section 3.1)."""

PLOT_SOLVER = SolverSettings("rk4", 100)
"""What the figures integrate with by default (the NLL's 1000 steps would be 10x slower)."""


def integrate_fixed(
    f: Dynamics,
    y0: State,
    t_start: float,
    t_end: float,
    steps: int,
    *,
    step: Callable[[Dynamics, Tensor, float, State], State] = rk4_step,
    on_step: StepHook | None = None,
    grid: Grid | str = "uniform",
) -> State:
    """Integrate ``dy/dt = f(t, y)`` from ``t_start`` to ``t_end`` with ``steps`` steps.

    Args:
        f: the dynamics.
        y0: the state at ``t_start``.
        t_start: start time.
        t_end: end time (may be below ``t_start``).
        steps: number of steps, >= 1.
        step: the one-step method.
        on_step: hook called after each step.
        grid: ``"uniform"``: equal steps; ``"log"``: steps equal in log t (both ends > 0),
            :func:`step_times`.

    Returns:
        The state at ``t_end``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ref = y0[0]
    y = y0
    if grid == "uniform":  # the arithmetic of psm before grids, kept for bit-equal results
        h = (t_end - t_start) / steps
        for k in range(steps):
            t = torch.tensor(t_start + k * h, dtype=ref.dtype, device=ref.device)
            y = step(f, t, h, y)
            if on_step is not None:
                on_step(t_start + (k + 1) * h if k + 1 < steps else t_end, y)
        return y
    times = step_times(t_start, t_end, steps, grid)
    for k in range(steps):
        t = torch.tensor(times[k], dtype=ref.dtype, device=ref.device)
        y = step(f, t, times[k + 1] - times[k], y)
        if on_step is not None:
            on_step(times[k + 1], y)
    return y


def step_times(t_start: float, t_end: float, steps: int, grid: Grid | str) -> list[float]:
    """The ``steps + 1`` step points from ``t_start`` to ``t_end`` (both ends exact).

    Args:
        t_start: start time.
        t_end: end time (may be below ``t_start``).
        steps: number of steps, >= 1.
        grid: ``"uniform"`` (``t_start + k h``) or ``"log"`` (geometric,
            ``t_start (t_end / t_start)^(k / steps)``; both ends must be > 0).

    Raises:
        ValueError: an unknown grid, or a log grid reaching t <= 0.
    """
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r} (choose from {', '.join(GRIDS)})")
    if grid == "uniform":
        h = (t_end - t_start) / steps
        inner = [t_start + k * h for k in range(1, steps)]
    else:
        if not (t_start > 0 and t_end > 0):
            raise ValueError(f"a log grid needs times > 0, got [{t_start:g}, {t_end:g}]")
        ratio = math.log(t_end / t_start)
        inner = [t_start * math.exp(ratio * k / steps) for k in range(1, steps)]
    return [t_start, *inner, t_end]


FIRST_STEP_FRACTION = 0.01
"""The adaptive solver's first step, as a fraction of the segment (it then adapts)."""


def integrate_adaptive(
    f: Dynamics,
    y0: State,
    t_start: float,
    t_end: float,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> State:
    """Integrate ``dy/dt = f(t, y)`` adaptively with :func:`torchdiffeq.odeint`, evaluating
    ``f`` only at times between ``t_start`` and ``t_end``.

    The end time is a prescribed step point (``step_t``: the last step lands on it instead of
    stepping past and interpolating back), and the first step is a fixed fraction of the segment
    (torchdiffeq's own first-step probe may look outside it).

    Args:
        f: the dynamics.
        y0: the state at ``t_start``.
        t_start: start time.
        t_end: end time (may be below ``t_start``).
        method: the torchdiffeq method.
        rtol: relative tolerance.
        atol: absolute tolerance.

    Returns:
        The state at ``t_end``.
    """
    ref = y0[0]
    ts = torch.tensor([t_start, t_end], dtype=torch.float64, device=ref.device)
    options = {
        "step_t": ts[1:],
        "first_step": FIRST_STEP_FRACTION * abs(t_end - t_start),
    }
    sol = odeint(f, tuple(y0), ts, rtol=rtol, atol=atol, method=method, options=options)
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


def steps_for(
    segments: Sequence[Segment], steps: int | Sequence[int], grid: Grid | str = "uniform"
) -> list[int]:
    """Steps per segment: a total budget split by length, or given per block id.

    Args:
        segments: the segments to integrate.
        steps: a total (split with :func:`allocate_steps`) or a sequence indexed by block id
            (e.g. ``[100, 900]`` for the paper's two image blocks ``[0, 0.1], [0.1, 1]``).
        grid: ``"uniform"``: a total is split by the segments' lengths; ``"log"``: by their
            lengths in log t (``log(t_hi / t_lo)``), as one geometric grid over all of them.

    Returns:
        Steps for each segment, in the order of ``segments``.
    """
    if isinstance(steps, int):
        if grid == "log":
            return allocate_steps([math.log(s.t_hi / s.t_lo) for s in segments], steps)
        return allocate_steps([s.length for s in segments], steps)
    per_block = list(steps)
    need = max(s.block for s in segments) + 1
    if len(per_block) < need:
        raise ValueError(f"steps per block: {len(per_block)} values for {need} blocks")
    out = [int(per_block[s.block]) for s in segments]
    if any(n < 1 for n in out):
        raise ValueError(f"steps per block must be >= 1, got {out}")
    return out


def solve_units(segments: Sequence[Segment], solver: SolverSettings) -> int:
    """How many times ``on_step`` fires in one solve (for progress bars): every step of a
    fixed-step method, every block of an adaptive one."""
    if solver.fixed_step:
        return sum(steps_for(segments, solver.steps, solver.grid))
    return len(segments)


def integrate_blocks(
    dynamics: BlockDynamics,
    y0: State,
    segments: Sequence[Segment],
    *,
    direction: Direction,
    solver: SolverSettings = PAPER_SOLVER,
    on_step: StepHook | None = None,
) -> State:
    """Integrate block by block, each block's dynamics over its own segment.

    Args:
        dynamics: ``f(block, t, y)``.
        y0: the state at the start (``t0`` for ``"to_noise"``, 1 for ``"to_data"``).
        segments: the blocks' segments in increasing time (:meth:`Partition.segments`).
        direction: ``"to_noise"`` (t0 → 1) or ``"to_data"`` (1 → t0).
        solver: the method and its steps or tolerances.
        on_step: hook called after each step (each block for adaptive methods).

    Returns:
        The state at the far end.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r} (choose from {', '.join(DIRECTIONS)})")
    method = SOLVERS[solver.method]
    segs = list(segments)
    counts = steps_for(segs, solver.steps, solver.grid) if method.fixed_step else [0] * len(segs)
    order = range(len(segs)) if direction == "to_noise" else range(len(segs) - 1, -1, -1)
    y = tuple(y0)
    for i in order:
        seg = segs[i]
        a, b = (seg.t_lo, seg.t_hi) if direction == "to_noise" else (seg.t_hi, seg.t_lo)

        def f(t: Tensor, y: State, _block: int = seg.block) -> State:
            return dynamics(_block, t, y)

        y = method(f, y, a, b, steps=counts[i], settings=solver, on_step=on_step)
    return y


def probability_flow(
    model: BlockModel,
    x: Tensor,
    *,
    direction: Direction,
    solver: SolverSettings = PAPER_SOLVER,
    on_step: StepHook | None = None,
) -> Tensor:
    """Carry points along the probability-flow ODE ``dx/dt = f(x, t)`` (eq. 30) through a model.

    Args:
        model: the assembled blocks.
        x: ``[B, *D]`` at ``t0`` (``"to_noise"``) or at 1 (``"to_data"``).
        direction, solver, on_step: as in :func:`integrate_blocks`.

    Returns:
        ``[B, *D]`` at the far end.
    """

    def dynamics(block: int, t: Tensor, y: State) -> State:
        return (model.field(y[0], t, block),)

    (out,) = integrate_blocks(
        dynamics, (x,), model.segments(), direction=direction, solver=solver, on_step=on_step
    )
    return out
