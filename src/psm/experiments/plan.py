"""What a preset needs and costs: its cells (one run each, shared between budgets), the cost of
each job, and what a reproduce folder still needs (``psm reproduce --plan``)."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from ..errors import PSMError
from ..runs.config import RunConfig
from ..runs.layout import CONFIG_FILE
from ..runs.run import Run
from . import legacy
from .catalogue import BUDGETS, BY_KEY, CURVE_METHODS, PRESETS, Preset, run_config, steps_per_block
from .harness import with_config

TRAIN_RATE = 220.0
"""Block-steps per second of one process with one thread (paper MLP, batch 512), measured on this
project's 2-core CPU: what :func:`plan_report` estimates hours with."""
EVAL_RATE = 1.4e5
"""Point-evaluations per second of the exact-trace field (paper MLP, 2D) on one such thread."""


@dataclass
class Cell:
    """One trained run and its evaluation."""

    data: str
    method: str
    steps: int
    budgets: list[str]
    run: str
    nll: float | None = None
    stderr: float | None = None
    n: int = 0
    eval_steps: int = 0
    eval_seconds: float = 0.0
    block_steps: int = 0
    train_seconds: float = 0.0
    floor: float = math.nan

    @property
    def excess(self) -> float | None:
        return None if self.nll is None else self.nll - self.floor


@dataclass
class CurvePoint:
    """One point of the NLL-against-compute curves."""

    data: str
    method: str
    steps: int
    block_steps: int
    train_seconds: float
    nll: float
    stderr: float


def selected(run: str, data: str, runs: Collection[str] | None) -> bool:
    """Whether ``runs`` (``--runs``) names a run: in full (``hg_tpsm_c_8000``, a curve's
    ``hg_sa``) or without its data set (``tpsm_c_8000``: on every data set); None names all."""
    return runs is None or run in runs or run.removeprefix(f"{data}_") in runs


def plan(preset: Preset) -> list[Cell]:
    """The runs a preset needs: one per (data, method, steps), with the budgets it serves."""
    cells: dict[tuple[str, str, int], Cell] = {}
    for data in preset.datasets:
        for key in preset.methods:
            m = BY_KEY[key]
            for budget in BUDGETS:
                s = steps_per_block(m, budget, preset.unit)
                c = cells.setdefault((data, key, s), Cell(data, key, s, [], f"{data}_{key}_{s}"))
                c.budgets.append(budget)
    return list(cells.values())


def cell_config(out: Path, preset: Preset, recipe: str, cell: Cell) -> RunConfig:
    """The run config of a table cell, in ``<out>/runs/<run>``."""
    return run_config(
        out / "runs" / cell.run, cell.data, BY_KEY[cell.method], cell.steps, recipe,
        n_test=preset.n_test, eval_steps=preset.eval_steps, eval_solver=preset.eval_solver,
    )  # fmt: skip


def curve_config(
    out: Path, preset: Preset, recipe: str, data: str, key: str, steps: int
) -> RunConfig:
    """The run config of one point of a method's curve: its one run, ``<out>/curves/<data>_<key>``,
    at the step target ``steps``."""
    return run_config(
        out / "curves" / f"{data}_{key}", data, BY_KEY[key], steps, recipe,
        n_test=preset.curve_n_test, eval_steps=preset.eval_steps, eval_solver=preset.eval_solver,
    )  # fmt: skip


def cell_cost(preset: Preset, cell: Cell) -> float:
    """Estimated one-thread seconds to train and score a cell from scratch
    (:data:`TRAIN_RATE`, :data:`EVAL_RATE`; RK4: 4 field evaluations per step)."""
    m = BY_KEY[cell.method]
    steps = m.eval_steps or preset.eval_steps
    return m.networks * cell.steps / TRAIN_RATE + 4.0 * preset.n_test * steps / EVAL_RATE


def curve_cost(preset: Preset, key: str) -> float:
    """Estimated one-thread seconds for one method's curve on one data set."""
    m = BY_KEY[key]
    evals = len(preset.curve) * 4.0 * preset.curve_n_test * preset.eval_steps / EVAL_RATE
    return m.networks * max(preset.curve, default=0) / TRAIN_RATE + evals


@dataclass
class PlanRow:
    """What one run of a preset still needs (:func:`plan_rows`)."""

    data: str
    run: str
    networks: int
    steps: int
    block_steps_left: int
    evaluations_left: int
    point_evals_left: float
    state: str


@dataclass(frozen=True)
class _Eval:
    """One evaluation a run owes: its config, where the old cache kept it, whether a curve
    point's, and its size (test points, solver steps)."""

    config: RunConfig
    old: Path
    curve: bool
    n: int
    steps: int


def _scored(run: Run | None, ev: _Eval) -> bool:
    """Whether ``ev`` is scored in the run's ``nll.jsonl`` or the old cache."""
    if run is None:
        return False
    try:
        view = with_config(run, ev.config)
    except ValueError:  # the folder holds another problem: nothing of this one is scored
        return False
    return legacy.lookup(view, ev.old, curve=ev.curve) is not None


def plan_rows(out: str | Path, preset_name: str, recipe: str = "paper",
              datasets: tuple[str, ...] | None = None,
              runs: Collection[str] | None = None) -> list[PlanRow]:  # fmt: skip
    """Every run of a preset (or those ``runs`` names, see :func:`selected`) with the training
    and evaluation it still needs in ``out``, per data set in the order
    :func:`~psm.experiments.reproduce.reproduce` takes them (cheapest first); reads the disk,
    trains nothing."""
    out, preset = Path(out), PRESETS[preset_name]
    rows: list[tuple[int, float, PlanRow]] = []

    def row(data: str, key: str, steps: int, run_dir: Path, evals: list[_Eval], cost: float):
        if not selected(run_dir.name, data, runs):
            return
        m = BY_KEY[key]
        done_steps, run = 0, None
        if (run_dir / CONFIG_FILE).exists():
            try:
                run = Run.open(run_dir)
                done_steps = sum(min(s.step, steps) for s in run.ledger.statuses())
            except PSMError:
                done_steps, run = 0, None
        left = m.networks * steps - done_steps
        todo = [e for e in evals if not _scored(run, e)]
        point_evals = sum(4.0 * e.n * e.steps for e in todo)  # RK4: 4 evaluations per step
        state = (
            "scored"
            if not todo and left <= 0
            else "trained"
            if left <= 0
            else ("partly trained" if done_steps else "to do")
        )
        rows.append((preset.datasets.index(data), cost,
                     PlanRow(data, run_dir.name, m.networks, steps, max(0, left), len(todo),
                             point_evals, state)))  # fmt: skip

    for cell in plan(preset):
        if datasets is not None and cell.data not in datasets:
            continue
        steps = BY_KEY[cell.method].eval_steps or preset.eval_steps
        ev = _Eval(cell_config(out, preset, recipe, cell), legacy.cell_path(out, cell.run),
                   False, preset.n_test, steps)  # fmt: skip
        row(cell.data, cell.method, cell.steps, out / "runs" / cell.run, [ev],
            cell_cost(preset, cell))  # fmt: skip
    for data in datasets or preset.datasets:
        for key in CURVE_METHODS if preset.curve else ():
            evals = [_Eval(curve_config(out, preset, recipe, data, key, s),
                           legacy.curve_path(out, data, key, s), True, preset.curve_n_test,
                           preset.eval_steps) for s in preset.curve]  # fmt: skip
            run_dir = out / "curves" / f"{data}_{key}"
            row(data, key, max(preset.curve), run_dir, evals, curve_cost(preset, key))
    return [r for _, _, r in sorted(rows, key=lambda r: r[:2])]


def plan_report(rows: list[PlanRow], processes: int) -> str:
    """The plan as a table, with totals and hours estimated at :data:`TRAIN_RATE` and
    :data:`EVAL_RATE` per process (data sets side by side over ``processes``)."""
    lines = [f"{'run':<22} {'nets':>5} {'steps/net':>10} {'block-steps left':>17} "
             f"{'evals left':>10}  state"]  # fmt: skip
    for r in rows:
        lines.append(f"{r.run:<22} {r.networks:>5} {r.steps:>10,} {r.block_steps_left:>17,} "
                     f"{r.evaluations_left:>10}  {r.state}")  # fmt: skip
    per_data: dict[str, float] = {}
    for r in rows:
        per_data[r.data] = per_data.get(r.data, 0.0) + (
            r.block_steps_left / TRAIN_RATE + r.point_evals_left / EVAL_RATE
        )
    train = sum(r.block_steps_left for r in rows)
    evals = sum(r.evaluations_left for r in rows)
    loads = sorted(per_data.values(), reverse=True)
    lanes = [0.0] * max(1, min(processes, len(loads) or 1))
    for load in loads:  # data sets side by side: the longest first, each to the freest lane
        lanes[lanes.index(min(lanes))] += load
    hours = max(lanes) / 3600
    lines.append(
        f"left: {train:,} block-steps and {evals} evaluations; about {hours:.1f} h with "
        f"{len(lanes)} process(es) (at {TRAIN_RATE:.0f} block-steps/s and "
        f"{EVAL_RATE:.1e} point-evaluations/s per process, a 2-core CPU's one-thread rates)"
    )
    return "\n".join(lines)
