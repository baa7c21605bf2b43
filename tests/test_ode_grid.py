"""Fixed-step grids (issue 21): steps evenly spaced in t (default) or in log t, against an
analytic ODE whose solution changes fastest near t0."""

from __future__ import annotations

import argparse
import itertools
import json
import math

import pytest
import torch

from helpers import one_line_error, run_cli, tiny_config
from psm.commands.model_flags import GRID_CHOICES, ode_settings
from psm.commands.nll import record_solver
from psm.core.ode import (
    GRIDS,
    SolverSettings,
    allocate_steps,
    integrate_blocks,
    integrate_fixed,
    solve_units,
    step_times,
    steps_for,
)
from psm.core.partition import Segment, equal
from psm.errors import PSMError
from psm.runs.config import validate_config
from psm.runs.run import Run
from psm.training.train import train_block

D64 = torch.float64
T0 = 1e-4
LAM = -0.5  # y' = λ y / t: y(t) = y(a) (t / a)^λ, steep near t0, flat near 1


def power_law(t, y):
    return (LAM * y[0] / t,)


def exact(a: float, b: float, y0: torch.Tensor) -> torch.Tensor:
    return y0 * (b / a) ** LAM


Y0 = torch.tensor([1.0, -3.0], dtype=D64)


def error(grid: str, steps: int, a: float = T0, b: float = 1.0) -> float:
    (y,) = integrate_fixed(power_law, (Y0,), a, b, steps, grid=grid)
    want = exact(a, b, Y0)
    return float(((y - want) / want).abs().max())


def test_step_times_are_geometric_for_log_and_even_for_uniform():
    ts = step_times(T0, 1.0, 8, "log")
    assert ts[0] == T0 and ts[-1] == 1.0 and len(ts) == 9
    ratios = [b / a for a, b in itertools.pairwise(ts)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)
    assert ratios[0] == pytest.approx(10 ** (4 / 8), rel=1e-12)
    back = step_times(1.0, T0, 8, "log")  # towards the data: the same points, reversed
    assert back[0] == 1.0 and back[-1] == T0
    assert back[::-1] == pytest.approx(ts, rel=1e-12)
    assert step_times(0.2, 1.0, 4, "uniform") == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    with pytest.raises(ValueError, match="times > 0"):
        step_times(0.0, 1.0, 4, "log")
    with pytest.raises(ValueError, match="unknown grid"):
        step_times(T0, 1.0, 4, "cosine")


def test_the_log_grid_reaches_the_analytic_end_point_at_rk4_order():
    e40, e80 = error("log", 40), error("log", 80)
    assert e80 < 1e-5
    assert math.log2(e40 / e80) == pytest.approx(4, abs=0.3)  # fourth order
    hooks: list[float] = []
    integrate_fixed(power_law, (Y0,), T0, 1.0, 5, grid="log", on_step=lambda t, y: hooks.append(t))
    assert hooks == pytest.approx(step_times(T0, 1.0, 5, "log")[1:], rel=1e-12)
    assert hooks[-1] == 1.0  # lands exactly on the end
    # and backwards in time, from 1 down to t0
    (y,) = integrate_fixed(power_law, (Y0,), 1.0, T0, 80, grid="log")
    torch.testing.assert_close(y, exact(1.0, T0, Y0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("steps", [10, 40, 160])
def test_the_log_grid_beats_the_uniform_one_on_a_field_steep_near_t0(steps):
    assert error("log", steps) * 100 < error("uniform", steps)
    # the uniform grid needs far more steps for what the log grid does with `steps`
    assert error("uniform", 16 * steps) > error("log", steps)


def test_a_budget_is_split_by_log_length_and_the_blocks_make_one_geometric_grid():
    segs = equal(4, t0=T0).segments()
    counts = steps_for(segs, 80, "log")
    assert counts == allocate_steps([math.log(s.t_hi / s.t_lo) for s in segs], 80)
    assert counts[0] > 60 and sum(counts) == 80  # most steps in the block next to t0
    assert steps_for(segs, 80) == allocate_steps([s.length for s in segs], 80)  # default
    assert steps_for(segs, (5, 1, 2, 3), "log") == [5, 1, 2, 3]  # per block: as given
    solver = SolverSettings("rk4", 80, grid="log")
    assert solve_units(segs, solver) == 80
    times: list[float] = []
    (y,) = integrate_blocks(
        lambda b, t, y: power_law(t, y), (Y0,), segs, direction="to_noise", solver=solver,
        on_step=lambda t, y: times.append(t),
    )  # fmt: skip
    torch.testing.assert_close(y, exact(T0, 1.0, Y0), rtol=1e-5, atol=0)
    ratios = [b / a for a, b in zip([T0, *times], times)]
    assert max(ratios) / min(ratios) < 1.5  # near one geometric grid (rounding per block)


@pytest.mark.parametrize("direction", ["to_noise", "to_data"])
def test_log_grid_evaluates_each_block_only_inside_its_segment(direction):
    segs = [Segment(0, T0, 0.3), Segment(1, 0.3, 0.4), Segment(2, 0.4, 1.0)]
    calls: list[tuple[int, float]] = []

    def dynamics(block, t, y):
        calls.append((block, float(t)))
        return (-(1.0 + block) * y[0],)

    solver = SolverSettings("rk4", 30, grid="log")
    integrate_blocks(dynamics, (Y0,), segs, direction=direction, solver=solver)
    assert {b for b, _ in calls} == {0, 1, 2}
    outside = [(b, t) for b, t in calls if not segs[b].t_lo - 1e-12 <= t <= segs[b].t_hi + 1e-12]
    assert outside == []


# ---------------------------------------------------------------------- settings and flags
def test_solver_settings_take_a_grid_only_for_fixed_step_methods():
    assert SolverSettings().grid == "uniform"
    assert SolverSettings("rk4", 250, grid="log").describe() == "rk4 250 steps, log grid"
    assert SolverSettings("rk4", 250).describe() == "rk4 250 steps"
    with pytest.raises(ValueError, match="unknown grid"):
        SolverSettings(grid="cosine")
    with pytest.raises(ValueError, match="fixed-step"):
        SolverSettings("dopri5", grid="log")
    assert GRID_CHOICES == GRIDS


def flags(**kw):
    return argparse.Namespace(**{"solver": None, "steps": None, "rtol": None, "atol": None,
                                 "step_grid": None, **kw})  # fmt: skip


def test_grid_flag_over_the_runs_solver():
    run_solver = SolverSettings("rk4", 100)
    assert ode_settings(flags(), run_solver, blocks=2) == run_solver
    assert ode_settings(flags(step_grid="log"), run_solver, blocks=2) == SolverSettings(
        "rk4", 100, grid="log"
    )
    logged = SolverSettings("rk4", 100, grid="log")
    assert ode_settings(flags(solver="dopri5"), logged, blocks=2).grid == "uniform"
    with pytest.raises(PSMError, match="--grid applies to fixed-step solvers"):
        ode_settings(flags(solver="dopri5", step_grid="log"), run_solver, blocks=2)


def test_an_nll_record_gives_back_its_grid():
    rec = {"solver": "rk4", "steps": 30, "rtol": None, "atol": None, "grid": "log"}
    assert record_solver(json.loads(json.dumps(rec))) == SolverSettings("rk4", 30, grid="log")
    del rec["grid"]  # a record made before grids existed
    assert record_solver(rec) == SolverSettings("rk4", 30)


def test_psm_nll_records_the_log_grid_as_its_own_evaluation(tmp_path, capsys):
    cfg = tiny_config(eval={"n_test": 16, "steps": 6, "solver": "rk4", "test_seed": 1})
    run = Run.create(validate_config(cfg), tmp_path / "run")
    for b in range(run.num_blocks):
        assert train_block(run, b).state == "done"
    code, out_u, err = run_cli(capsys, "nll", run.path, "--no-progress")
    assert code == 0, err
    code, out_l, err = run_cli(capsys, "nll", run.path, "--grid", "log", "--no-progress")
    assert code == 0, err
    assert "log grid" in out_l and "log grid" not in out_u
    uniform, log = (json.loads(x) for x in (run.path / "nll.jsonl").read_text().splitlines())
    assert uniform["grid"] is None and log["grid"] == "log"
    assert uniform["nll"] != log["nll"]  # another grid, another number
    one_line_error(
        capsys, "nll", run.path, "--solver", "dopri5", "--grid", "log", match="--grid applies"
    )
