"""``psm reproduce``: the paper's 2D tables (1, 10 and 11) on TY and HG, trained and scored here.

Every cell is an ordinary psm run under ``<out>/runs`` (so a second invocation reuses finished
runs and scores, and any run can be inspected with ``psm status``/``psm nll``/``psm plot``).
The methods, the three budgets (the paper's ratio, equal total compute, equal steps per
network), the presets and the recipes are :mod:`~psm.experiments.catalogue`'s; runs with equal
settings are shared across budgets (SA-DPM is the same run in all three; TPSM_B's paper ratio
and equal total coincide).

Test NLLs come from the ODE likelihood under each run's ``eval`` section (the presets: RK4 with
the exact trace) on held-out points, with standard errors, through the experiments' harness
(:mod:`~psm.experiments.harness`), which keeps each score as a record in the run's own
``nll.jsonl``; scores cached by earlier versions under ``<out>/evals/`` are still read
(:mod:`~psm.experiments.legacy`). Each NLL stands beside the paper's number and the floor of the
run's own t0 (:mod:`~psm.experiments.floors`), and as its excess over that floor: only the
excess compares rows with different t0 (the authors' SA script starts at 0.01).

This module is the orchestration only: which jobs, in which order (cheapest first, so a preset
stopped part way has filled the most cells), and gathering what every process scored into the
report (:mod:`~psm.experiments.report`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import torch

from ..runs.layout import CONFIG_FILE
from ..runs.nll_records import trained
from ..runs.run import Run
from . import harness, legacy
from .catalogue import BY_KEY, CURVE_METHODS, PRESETS, Preset
from .floors import floor_nll
from .harness import Score, with_config
from .plan import (
    Cell,
    CurvePoint,
    cell_config,
    cell_cost,
    curve_config,
    curve_cost,
    plan,
    selected,
)
from .report import figures, write_results


def started(out: str | Path) -> bool:
    """Whether ``out`` holds a reproduction begun (runs, curves, or the old score cache)."""
    out = Path(out)
    return any((out / sub).is_dir() for sub in ("runs", "curves")) or legacy.has_cache(out)


def reproduce(
    out: str | Path,
    preset_name: str = "small",
    *,
    recipe: str = "paper",
    threads: int = 2,
    datasets: tuple[str, ...] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    report_only: bool = False,
    runs: Collection[str] | None = None,
) -> list[Cell]:
    """Train (or reuse) and score every cell of a preset; write ``results.md``/``.json``.

    ``datasets`` restricts the work to some data sets (e.g. one process per data set on a
    machine with spare cores); the results files then hold every cell already scored in
    ``out``, whichever process scored it.

    Args:
        out: the folder (``runs/``, ``curves/``, ``floors/``, results, figures).
        preset_name: a key of :data:`~psm.experiments.catalogue.PRESETS`.
        recipe: a key of :data:`~psm.experiments.catalogue.RECIPES`.
        threads: torch threads.
        datasets: train and score only these (default: the preset's).
        progress: progress bars.
        log: where one line per finished step goes.
        report_only: train and score nothing: write the results of the cells and curve points
            already scored in ``out`` (a preset stopped part way; the rest show as "-").
        runs: train and score only the runs these name
            (:func:`~psm.experiments.plan.selected`; default all).

    Returns:
        The cells (``nll`` None where not scored).
    """
    out = Path(out)
    preset = PRESETS[preset_name]
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    cells = plan(preset)
    mine = [] if report_only else [c for c in cells if (datasets is None or c.data in datasets)
                                   and selected(c.run, c.data, runs)]  # fmt: skip
    jobs: list[tuple[float, Cell | tuple[str, str]]] = [(cell_cost(preset, c), c) for c in mine]
    for data in (datasets or preset.datasets) if preset.curve and not report_only else ():
        jobs += [(curve_cost(preset, key), (data, key)) for key in CURVE_METHODS
                 if selected(f"{data}_{key}", data, runs)]  # fmt: skip
    jobs.sort(key=lambda j: j[0])  # cheapest first: a preset stopped part way has filled the most
    for i, (_, job) in enumerate(jobs, 1):
        if isinstance(job, Cell):
            _score_cell(out, preset, recipe, job, f"[{i}/{len(jobs)}] {job.run}", progress, log)
        else:
            data, key = job
            _curve(out, preset, recipe, data, key, f"[{i}/{len(jobs)}] curve {data} {key}",
                   progress, log)  # fmt: skip
    for cell in cells:  # cells another process scored
        if cell not in mine:
            _load_cell(out, preset, recipe, cell)
    curves = _load_curves(out, preset, recipe)
    write_results(out, preset_name, recipe, [c for c in cells if c.nll is not None], curves)
    if preset.figures:
        figures(out, cells, progress)
    return cells


def _evaluate(
    run: Run,
    cell: Cell,
    old: Path,
    progress: bool,
    *,
    cached_only: bool = False,
    curve: bool = False,
) -> Score | None:
    """Fill ``cell`` with the run's score under its ``eval`` section: cached (the run's
    ``nll.jsonl``, else the old cache file ``old``), else scored now through the harness
    (unless ``cached_only``). Returns the score (None: not scored)."""
    score = legacy.lookup(run, old, curve=curve)
    if score is None and not cached_only:
        score = harness.evaluate(run, progress=progress)
    if score is not None:
        cell.nll, cell.stderr, cell.n = score.nll, score.stderr, score.n
        cell.eval_steps = score.steps if isinstance(score.steps, int) else 0
        cell.eval_seconds = score.seconds
    return score


def _score_cell(out: Path, preset: Preset, recipe: str, cell: Cell, label: str, progress: bool,
                log: Callable[[str], None]) -> None:  # fmt: skip
    """Train (or reuse) one cell's run and score it (cached)."""
    run = Run.create(cell_config(out, preset, recipe, cell))
    harness.train(run, run.ledger.not_done(invocation=True), label=label, progress=progress)
    cell.block_steps, cell.train_seconds = trained(run)
    cell.floor = floor_nll(cell.data, BY_KEY[cell.method], out / "floors", preset.floor_samples)
    _evaluate(run, cell, legacy.cell_path(out, cell.run), progress)
    log(f"{label}: NLL {cell.nll:.4f} ± {cell.stderr:.4f} "
        f"(floor {cell.floor:.3f}; {cell.block_steps:,} block-steps)")  # fmt: skip


def _curve(out: Path, preset: Preset, recipe: str, data: str, key: str, label: str,
           progress: bool, log: Callable[[str], None]) -> None:  # fmt: skip
    """One method's curve on one data set: trained to growing step targets (one run, extended:
    a constant learning rate makes an extended run the same as a straight one), scored at each
    (each score records the training compute it was scored after)."""
    for steps in preset.curve:
        run = Run.create(curve_config(out, preset, recipe, data, key, steps))
        harness.train(run, run.ledger.not_done(invocation=True), label=label, progress=progress)
        cell = Cell(data, key, steps, [], run.path.name)
        _evaluate(run, cell, legacy.curve_path(out, data, key, steps), progress, curve=True)
        log(f"{label} {steps} steps/block: NLL {cell.nll:.4f} ± {cell.stderr:.4f}")


def _load_cell(out: Path, preset: Preset, recipe: str, cell: Cell) -> None:
    """Fill a cell from its cached score and run status, if they exist."""
    run_dir = out / "runs" / cell.run
    if not (run_dir / CONFIG_FILE).exists():
        return
    try:
        run = with_config(Run.open(run_dir), cell_config(out, preset, recipe, cell))
    except ValueError:  # the folder holds another problem (another recipe)
        return
    if _evaluate(run, cell, legacy.cell_path(out, cell.run), False, cached_only=True) is None:
        return
    cell.block_steps, cell.train_seconds = trained(run)
    cell.floor = floor_nll(cell.data, BY_KEY[cell.method], out / "floors", preset.floor_samples)


def _load_curves(out: Path, preset: Preset, recipe: str) -> list[CurvePoint]:
    """The curve points scored so far (by any process)."""
    points = []
    for data in preset.datasets:
        for key in CURVE_METHODS if preset.curve else ():
            run_dir = out / "curves" / f"{data}_{key}"
            if not (run_dir / CONFIG_FILE).exists():
                continue
            run = Run.open(run_dir)
            for steps in preset.curve:
                try:
                    view = with_config(run, curve_config(out, preset, recipe, data, key, steps))
                except ValueError:  # the folder holds another problem (another recipe)
                    break
                score = legacy.lookup(view, legacy.curve_path(out, data, key, steps), curve=True)
                if score is None or score.block_steps is None:
                    continue
                points.append(
                    CurvePoint(data, key, steps, score.block_steps, score.train_seconds or 0.0,
                               score.nll, score.stderr)
                )  # fmt: skip
    return points


__all__ = ["reproduce", "started"]
