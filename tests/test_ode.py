"""ODE solvers against analytic solutions, and block-by-block integration."""

from __future__ import annotations

import math

import pytest
import torch

from psm.core.model import BlockModel
from psm.core.ode import (
    SOLVER_NAMES,
    SolverSettings,
    allocate_steps,
    euler_step,
    integrate_adaptive,
    integrate_blocks,
    integrate_fixed,
    probability_flow,
    rk4_step,
    steps_for,
)
from psm.core.partition import Segment, splits
from psm.core.process import make_process

D64 = torch.float64
STEPS = {"euler": euler_step, "rk4": rk4_step}


def _dynamics(t, y):
    """``y' = y cos t`` and ``z' = -2 t z`` (a tuple state, like the likelihood's (x, Δ))."""
    return (y[0] * torch.cos(t), -2.0 * t * y[1])


def _exact(t0: float, t1: float, y0, z0):
    return y0 * math.exp(math.sin(t1) - math.sin(t0)), z0 * math.exp(t0**2 - t1**2)


Y0 = (torch.tensor([1.0, -0.5], dtype=D64), torch.tensor([2.0], dtype=D64))


def _error(method: str, steps: int, t0: float = 0.1, t1: float = 1.3) -> float:
    y, z = integrate_fixed(_dynamics, Y0, t0, t1, steps, step=STEPS[method])
    ye, ze = _exact(t0, t1, Y0[0], Y0[1])
    return max((y - ye).abs().max().item(), (z - ze).abs().max().item())


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("rk4", 4)])
def test_fixed_step_convergence_order(method, order):
    e1, e2 = _error(method, 40), _error(method, 80)
    assert math.log2(e1 / e2) == pytest.approx(order, abs=0.15)


def test_rk4_and_euler_reach_the_analytic_end_point():
    assert _error("rk4", 400) < 1e-11
    assert _error("euler", 2000) < 2e-3


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_integration_backwards_in_time(method):
    # from the exact value at t1 back to t0
    ye, ze = _exact(0.1, 1.3, Y0[0], Y0[1])
    y, z = integrate_fixed(_dynamics, (ye, ze), 1.3, 0.1, 400, step=STEPS[method])
    tol = 1e-10 if method == "rk4" else 5e-3
    torch.testing.assert_close(y, Y0[0], rtol=0, atol=tol)
    torch.testing.assert_close(z, Y0[1], rtol=0, atol=tol)


@pytest.mark.parametrize(("t0", "t1"), [(0.1, 1.3), (1.3, 0.1)])
def test_dopri5_matches_analytic(t0, t1):
    start = _exact(0.1, t0, Y0[0], Y0[1])
    y, z = integrate_adaptive(_dynamics, start, t0, t1, rtol=1e-10, atol=1e-10)
    ye, ze = _exact(0.1, t1, Y0[0], Y0[1])
    torch.testing.assert_close(y, ye, rtol=0, atol=1e-8)
    torch.testing.assert_close(z, ze, rtol=0, atol=1e-8)


def test_step_hook_sees_every_step_and_the_exact_end():
    seen: list[float] = []
    integrate_fixed(_dynamics, Y0, 0.3, 0.9, 7, on_step=lambda t, y: seen.append(t))
    assert len(seen) == 7
    assert seen[-1] == 0.9
    assert seen == sorted(seen)


def test_allocate_steps_proportional_with_at_least_one():
    assert allocate_steps([0.1, 0.9], 1000) == [100, 900]  # the paper's image split
    steps = allocate_steps([0.003, 0.017, 0.05, 0.08, 0.25, 0.35, 0.25], 1000)
    assert sum(steps) == 1000 and min(steps) >= 1
    assert steps == [3, 17, 50, 80, 250, 350, 250]
    assert allocate_steps([1e-6, 1.0], 10) == [1, 9]  # a tiny block still gets a step
    assert sum(allocate_steps([1 / 3] * 3, 10)) == 10
    with pytest.raises(ValueError):
        allocate_steps([1.0], 0)


def test_steps_for_per_block_ids():
    segs = [Segment(0, 1e-4, 0.1), Segment(1, 0.1, 1.0)]
    assert steps_for(segs, [100, 900]) == [100, 900]
    assert steps_for(segs, 10) == [1, 9]
    with pytest.raises(ValueError):
        steps_for(segs, [5])


# piecewise-linear ODE y' = r_b y with a different rate on each block: the exact end point is
# y0 exp(Σ r_b len_b), and a solver that let a block's field leak across a boundary would miss it
SEGS = [Segment(0, 1e-3, 0.2), Segment(1, 0.2, 0.25), Segment(2, 0.25, 1.0)]
RATES = [1.5, -4.0, 0.7]


def _block_dynamics(block, t, y):
    return (RATES[block] * y[0],)


@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
@pytest.mark.parametrize("direction", ["to_noise", "to_data"])
def test_blocks_use_only_their_own_segment(solver, direction):
    growth = math.exp(sum(r * s.length for r, s in zip(RATES, SEGS)))
    y0 = torch.tensor([1.0, 2.0], dtype=D64)
    (y,) = integrate_blocks(
        _block_dynamics,
        (y0,),
        SEGS,
        direction=direction,
        solver=SolverSettings(solver, 300, 1e-10, 1e-10),
    )
    want = y0 * (growth if direction == "to_noise" else 1 / growth)
    torch.testing.assert_close(y, want, rtol=1e-8, atol=0)


def test_euler_with_one_step_per_block_is_a_product_of_block_steps():
    y0 = torch.tensor([1.0], dtype=D64)
    (y,) = integrate_blocks(
        _block_dynamics,
        (y0,),
        SEGS,
        direction="to_noise",
        solver=SolverSettings("euler", [1, 1, 1]),
    )
    want = math.prod(1 + r * s.length for r, s in zip(RATES, SEGS))
    assert y.item() == pytest.approx(want, rel=1e-14)


def test_bad_solver_and_direction_are_refused():
    with pytest.raises(ValueError, match="unknown solver 'heun'"):
        SolverSettings("heun")
    with pytest.raises(ValueError, match="direction"):
        integrate_blocks(_block_dynamics, Y0[:1], SEGS, direction="up")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", SOLVER_NAMES)
@pytest.mark.parametrize("direction", ["to_noise", "to_data"])
def test_every_solver_evaluates_a_block_only_inside_its_segment(method, direction):
    """Every call of a block's dynamics lies in that block's own segment, for every solver and
    both directions (dopri5 left alone steps past a block's end and interpolates back)."""
    segs = [Segment(0, 1e-4, 0.3), Segment(1, 0.3, 0.4), Segment(2, 0.4, 1.0)]
    calls: list[tuple[int, float]] = []

    def dynamics(block, t, y):
        calls.append((block, float(t)))
        return (-(3.0 + block) * (0.5 + float(t)) * y[0],)  # a stiff-ish field, jumps at edges

    y0 = torch.tensor([1.0, -2.0], dtype=D64)
    integrate_blocks(
        dynamics, (y0,), segs, direction=direction, solver=SolverSettings(method, 60, 1e-6, 1e-6)
    )
    assert {b for b, _ in calls} == {0, 1, 2}
    outside = [(b, t) for b, t in calls if not segs[b].t_lo - 1e-12 <= t <= segs[b].t_hi + 1e-12]
    assert outside == []


@pytest.mark.parametrize("method", SOLVER_NAMES)
@pytest.mark.parametrize("direction", ["to_noise", "to_data"])
def test_a_block_model_is_only_asked_inside_each_block(method, direction):
    """The same through a model: each block net is called only at times of its own block
    (SA sampling towards the data must not go below t0, where b(t) < 0)."""
    partition = splits([0, 0.3, 0.4, 1])
    seen: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def net(b):
        def f(x, t):
            seen[b].extend(t.tolist())
            return 0.3 * x + t[:, None]

        return f

    model = BlockModel(make_process("vp"), partition, [net(b) for b in range(3)])
    x = torch.randn(4, 2, dtype=D64)
    probability_flow(model, x, direction=direction, solver=SolverSettings(method, 30))
    for seg in partition.segments():
        ts = torch.tensor(seen[seg.block], dtype=D64)
        assert len(ts) and ts.min() >= seg.t_lo - 1e-12 and ts.max() <= seg.t_hi + 1e-12
