"""``psm reproduce``: the paper's 2D tables (1, 10 and 11) on TY and HG, trained and scored here.

Every cell is an ordinary psm run under ``<out>/runs`` (so a second invocation reuses finished
runs and evaluations, and any run can be inspected with ``psm status``/``psm nll``/``psm plot``).
Each method is trained under three budgets, all reported:

* ``paper ratio``: the paper's ratio of steps per network — the authors' scripts train SA-DPM for
  2,000,000 steps and every TPSM block for 500,000, so SA gets 4 units and a block 1 unit;
* ``equal total``: equal total compute (block-steps summed over the blocks: what one machine sees),
  4 units for every method, split over its blocks;
* ``equal per net``: equal steps per network (the parallel view: wall-clock is one block's time when
  every block has its own worker), 4 units per network.

One unit is the preset's ``unit`` steps (:data:`PRESETS`). Runs with equal settings are shared
across budgets (SA-DPM is the same run in all three; TPSM_B's paper ratio and equal total
coincide).
Test NLLs come from the ODE likelihood (RK4, exact trace) on held-out points, with standard
errors, beside the paper's number and the floor of the run's own t0: a likelihood that starts at
t0 scores the data under ``p_{t0}`` at best, so ``E[-log p_{t0}(x)]`` (exact, from the mixture)
is what no model can beat; every NLL is also given as its excess over that floor.

The authors' SA-DPM scripts use b(t) = 12 t, start the likelihood at t0 = 0.01 and integrate
with 299 RK4 steps, unlike their TPSM scripts (b(t) = 10 t, t0 = 1e-4). Both SA rows are
trained and reported (``SA-DPM`` with the paper's settings, ``SA-DPM (authors' script)``); only
the excess over each row's own floor compares them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.ode import SolverSettings
from ..errors import PSMError
from ..executors.monitor import ProgressMonitor
from ..runs.atomic import atomic_write_json, atomic_write_text
from ..runs.config import RunConfig, validate_config
from ..runs.inference import evaluate_run
from ..runs.run import Run
from ..training.train import train_ensemble

DATASETS = ("ty", "hg")
PAPER_SA_STEPS, PAPER_BLOCK_STEPS = 2_000_000, 500_000  # the authors' scripts
FLOOR_SEED = 777


@dataclass(frozen=True)
class Method:
    """One row of the tables.

    Attributes:
        key: short name (run folder names).
        label: the row label.
        process: the ``process`` section.
        partition: the ``partition`` section (with its t0).
        paper: the paper's NLL per dataset and table, e.g. ``{"1": {"ty": 0.76, ...}}``.
        eval_steps: RK4 steps of this row's likelihood if it must differ from the preset's
            (the authors' SA script: 299).
        networks: K, the number of networks.
    """

    key: str
    label: str
    process: dict[str, Any]
    partition: dict[str, Any]
    paper: dict[str, dict[str, float]]
    eval_steps: int | None = None

    @property
    def networks(self) -> int:
        p = self.partition
        if p["kind"] == "equal":
            return int(p["blocks"])
        if p["kind"] == "splits":
            return len(p["splits"]) - 1
        return int(p["points"])


VP = {"name": "vp", "b_min": 0.0, "b_max": 10.0}
OT = {"name": "ot", "sigma_min": 1e-4}
T0 = 1e-4

METHODS: tuple[Method, ...] = (
    Method("sa", "SA-DPM", VP, {"kind": "equal", "blocks": 1, "t0": T0},
           {"1": {"ty": 0.76, "hg": 1.11}, "10": {"ty": 0.76, "hg": 1.11}}),
    Method("sa_authors", "SA-DPM (authors' script: b = 12t, t0 = 0.01, 299 RK4 steps)",
           {"name": "vp", "b_min": 0.0, "b_max": 12.0}, {"kind": "equal", "blocks": 1,
                                                           "t0": 0.01},
           {"1": {"ty": 0.76, "hg": 1.11}}, eval_steps=299),
    Method("tpsm_a", "TPSM_A {0, .1, 1}", VP, {"kind": "splits", "splits": [0, 0.1, 1], "t0": T0},
           {"1": {"ty": 0.69, "hg": 1.07}}),
    Method("tpsm_b", "TPSM_B {0, .02, .1, .3, 1}", VP,
           {"kind": "splits", "splits": [0, 0.02, 0.1, 0.3, 1], "t0": T0},
           {"1": {"ty": 0.64, "hg": 1.04}}),
    Method("tpsm10", "TPSM-10", VP, {"kind": "equal", "blocks": 10, "t0": T0},
           {"10": {"ty": 0.69, "hg": 1.05}}),
    Method("tpsm_c", "TPSM_C (200 blocks)", VP, {"kind": "equal", "blocks": 200, "t0": T0},
           {"1": {"ty": 0.58, "hg": 1.03}}),
    Method("dpsm", "DPSM (100 time-free nets)", VP, {"kind": "grid", "points": 100, "t0": T0}, {}),
    Method("fm_sa", "SA-DPM, flow matching", OT, {"kind": "equal", "blocks": 1, "t0": T0},
           {"11": {"ty": 0.75, "hg": 1.10}}),
    Method("fm_tpsm10", "TPSM-10, flow matching", OT, {"kind": "equal", "blocks": 10, "t0": T0},
           {"11": {"ty": 0.66, "hg": 1.04}}),
)  # fmt: skip
BY_KEY = {m.key: m for m in METHODS}

TABLES = {
    "1": ("Table 1 (VP)", ["sa", "sa_authors", "tpsm_a", "tpsm_b", "tpsm_c", "dpsm"]),
    "10": ("Table 10 (VP, 10 equal blocks)", ["sa", "tpsm10"]),
    "11": ("Table 11 (OT flow matching, 10 equal blocks)", ["fm_sa", "fm_tpsm10"]),
}

BUDGETS = {
    "paper ratio": "the paper's ratio of steps per network (SA 4 units, each block 1)",
    "equal total": "equal total block-steps (4 units, split over the blocks)",
    "equal per net": "equal steps per network (4 units each)",
}


def steps_per_block(method: Method, budget: str, unit: int) -> int:
    """Steps each network of ``method`` trains under ``budget`` (see the module docstring)."""
    k = method.networks
    if budget == "paper ratio":
        return 4 * unit if k == 1 else unit
    if budget == "equal total":
        return max(1, round(4 * unit / k))
    if budget == "equal per net":
        return 4 * unit
    raise ValueError(f"unknown budget {budget!r}")


@dataclass(frozen=True)
class Preset:
    """How big a reproduction is.

    Attributes:
        unit: steps of one budget unit (SA-DPM trains 4 units under every budget).
        n_test: held-out points per NLL.
        eval_steps: RK4 steps of the NLL over ``[t0, 1]``.
        datasets: which data sets.
        methods: which rows (default all).
        curve: per-block step targets at which SA-DPM and TPSM-10 are scored for the curves of
            NLL against training compute (empty: no curves).
        curve_n_test: held-out points per curve point.
        figures: density heat maps of every method (budget ``equal per net``) beside the truth.
        floor_samples: data samples of the Monte Carlo floor (its s.e. is about 1/sqrt of it).
    """

    unit: int
    n_test: int
    eval_steps: int
    datasets: tuple[str, ...] = DATASETS
    methods: tuple[str, ...] = tuple(BY_KEY)
    curve: tuple[int, ...] = ()
    curve_n_test: int = 5000
    figures: bool = True
    floor_samples: int = 1_000_000


PRESETS: dict[str, Preset] = {
    # CI: four rows, tiny budgets and a light likelihood; checks the wiring only
    "tiny": Preset(unit=10, n_test=200, eval_steps=20,
                   methods=("sa", "tpsm_a", "tpsm10", "fm_sa"), figures=False,
                   floor_samples=20000),
    # under 30 minutes on a 2-core machine; RK4 with 100 steps on 2,000 points
    "small": Preset(unit=150, n_test=2000, eval_steps=100, figures=False),
    # docs/results.md: 20,000 points, RK4 with 1000 steps (the paper's solver)
    "full": Preset(unit=2000, n_test=20000, eval_steps=1000,
                   curve=(250, 500, 1000, 2000, 4000, 8000)),
    # the authors' step counts (SA 2,000,000, each TPSM block 500,000): days on a CPU
    "paper": Preset(unit=PAPER_BLOCK_STEPS, n_test=20000, eval_steps=1000),
}  # fmt: skip

RECIPES: dict[str, dict[str, Any]] = {
    # appendix H: Adam at 1e-3, batch 512, fresh samples every step, paper MLP, ELU
    "paper": {"train": {"batch_size": 512, "lr": 1e-3}, "net": {"name": "mlp"}},
    # docs/results.md, "A better recipe": first-layer x-weights x30 at initialisation, a 2%
    # linear warm-up, then cosine decay from 3e-3 to 0 over each block's budget
    "psm": {
        "train": {"batch_size": 512, "lr": 3e-3, "lr_schedule": "cosine"},
        "warmup_fraction": 0.02,
        "net": {"name": "mlp", "input_scale": 30.0},
    },
}


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


def run_config(
    out: Path, data: str, method: Method, steps: int, recipe: str, *, n_test: int, eval_steps: int
) -> RunConfig:
    """The psm config of one cell."""
    rec = RECIPES[recipe]
    train = {"steps": steps, "seed": 0, "log_every": max(1, min(500, steps // 10)),
             "checkpoint_every": max(1, min(20000, steps)), **rec["train"]}  # fmt: skip
    if "warmup_fraction" in rec:
        train["warmup"] = round(rec["warmup_fraction"] * steps)
    return validate_config(
        {
            "name": f"{data}_{method.key}_{steps}",
            "out": str(out),
            "data": {"name": data},
            "process": method.process,
            "partition": method.partition,
            "net": rec["net"],
            "train": train,
            "eval": {"n_test": n_test, "steps": method.eval_steps or eval_steps},
        }
    )


def floor_nll(data: str, method: Method, cache: Path, samples: int = 1_000_000) -> float:
    """``E[-log p_{t0}(x)]`` over the data, exact density, Monte Carlo; cached in the folder
    ``cache``, one small file per (data, process, t0, samples)."""
    from ..data import make_dataset
    from ..runs.run_parts import Parts

    proc = json.dumps(method.process, sort_keys=True)
    key = f"{data}:{proc}:t0={method.partition['t0']}:n={samples}"
    path = cache / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    if path.exists():
        return float(json.loads(path.read_text())["floor"])
    ds = make_dataset(data)
    process = Parts(validate_config({"process": method.process})).process
    c = process.schedule(torch.tensor(float(method.partition["t0"]), dtype=torch.float64))
    x = ds.sample(samples, torch.Generator().manual_seed(FLOOR_SEED))
    lp = torch.cat([ds.marginal_log_prob(xb, float(c.alpha), float(c.sigma))  # type: ignore[attr-defined]
                    for xb in x.split(100_000)])  # fmt: skip
    floor = -float(lp.mean())
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": key, "floor": floor})
    return floor


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


TRAIN_RATE = 220.0
"""Block-steps per second of one process with one thread (paper MLP, batch 512), measured on this
project's 2-core CPU: what :func:`plan_report` estimates hours with."""
EVAL_RATE = 1.4e5
"""Point-evaluations per second of the exact-trace field (paper MLP, 2D) on one such thread."""

CURVE_METHODS = ("sa", "tpsm10")
"""The methods whose NLL is scored against training compute (a preset's ``curve``)."""


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


def plan_rows(out: str | Path, preset_name: str, recipe: str = "paper",
              datasets: tuple[str, ...] | None = None,
              runs: Collection[str] | None = None) -> list[PlanRow]:  # fmt: skip
    """Every run of a preset (or those ``runs`` names, see :func:`selected`) with the training
    and evaluation it still needs in ``out``, per data set in the order :func:`reproduce` takes
    them (cheapest first); reads the disk, trains nothing."""
    out, preset = Path(out), PRESETS[preset_name]
    rows: list[tuple[int, float, PlanRow]] = []

    def row(data: str, key: str, steps: int, run_dir: Path, evals: list[tuple[Path, int, int]],
            cost: float):  # fmt: skip
        if not selected(run_dir.name, data, runs):
            return
        m = BY_KEY[key]
        done_steps = 0
        if (run_dir / "config.yaml").exists():
            try:
                run = Run.open(run_dir)
                done_steps = sum(min(s.step, steps) for s in run.statuses())
            except PSMError:
                done_steps = 0
        left = m.networks * steps - done_steps
        todo = [(n, k) for path, n, k in evals if not path.exists()]
        point_evals = sum(4.0 * n * k for n, k in todo)  # RK4: 4 evaluations per step
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
        row(cell.data, cell.method, cell.steps, out / "runs" / cell.run,
            [(out / "evals" / f"{cell.run}.json", preset.n_test, steps)],
            cell_cost(preset, cell))  # fmt: skip
    for data in datasets or preset.datasets:
        for key in CURVE_METHODS if preset.curve else ():
            evals = [(out / "evals" / f"curve_{data}_{key}_{s}.json", preset.curve_n_test,
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
        out: the folder (``runs/``, ``evals/``, ``floors/``, results, figures).
        preset_name: a key of :data:`PRESETS`.
        recipe: a key of :data:`RECIPES`.
        threads: torch threads.
        datasets: train and score only these (default: the preset's).
        progress: progress bars.
        log: where one line per finished step goes.
        report_only: train and score nothing: write the results of the cells and curve points
            already scored in ``out`` (a preset stopped part way; the rest show as "-").
        runs: train and score only the runs these name (:func:`selected`; default all).

    Returns:
        The cells (``nll`` None where not scored).
    """
    out = Path(out)
    preset = PRESETS[preset_name]
    torch.set_num_threads(threads)
    (out / "evals").mkdir(parents=True, exist_ok=True)
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
            _load_cell(out, cell, preset.floor_samples)
    curves = _load_curves(out, preset)
    write_results(out, preset_name, recipe, [c for c in cells if c.nll is not None], curves)
    if preset.figures:
        _figures(out, cells, progress)
    return cells


def _train(run: Run, todo: list[int], label: str, progress: bool) -> None:
    """Train ``todo`` to the run's step targets; stopped short (Ctrl-C), raise so that nothing
    part-trained is scored (the same command resumes)."""
    with ProgressMonitor(run, todo, enabled=progress, desc=label):
        outs = train_ensemble(run, todo)
    if any(o.state != "done" for o in outs):
        raise KeyboardInterrupt


def _compute(run: Run) -> tuple[int, float]:
    """A run's training compute: block-steps over all blocks, and the longest block's seconds."""
    statuses = run.statuses()
    return sum(s.step for s in statuses), max(s.wall_time for s in statuses)


def _load_cell(out: Path, cell: Cell, floor_samples: int) -> None:
    """Fill a cell from its cached evaluation and run status, if they exist."""
    path = out / "evals" / f"{cell.run}.json"
    run_dir = out / "runs" / cell.run
    if not path.exists() or not (run_dir / "config.yaml").exists():
        return
    run = Run.open(run_dir)
    _evaluate(run, cell, path, False, cached_only=True)
    if cell.nll is None:
        return
    cell.block_steps, cell.train_seconds = _compute(run)
    cell.floor = floor_nll(cell.data, BY_KEY[cell.method], out / "floors", floor_samples)


def _evaluate(
    run: Run, cell: Cell, path: Path, progress: bool, *, cached_only: bool = False
) -> None:
    """Score a run once (cached in ``path``, keyed by the evaluation settings)."""
    ev = run.config.eval
    key = {"n": ev.n_test, "steps": ev.steps, "seed": ev.test_seed, "hash": run.hash}
    if path.exists():
        rec = json.loads(path.read_text())
        if rec.get("key") == key:
            cell.nll, cell.stderr, cell.n = rec["nll"], rec["stderr"], rec["n"]
            cell.eval_steps, cell.eval_seconds = rec["steps"], rec["seconds"]
            return
    if cached_only:
        return
    res = evaluate_run(
        run, solver=SolverSettings("rk4", ev.steps), batch_size=5000, progress=progress
    ).result
    cell.nll, cell.stderr, cell.n = res.nll, res.stderr, res.n
    cell.eval_steps, cell.eval_seconds = ev.steps, res.seconds
    atomic_write_json(path, {"key": key, "nll": res.nll, "stderr": res.stderr, "n": res.n,
                             "steps": ev.steps, "seconds": res.seconds})  # fmt: skip


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


def _score_cell(out: Path, preset: Preset, recipe: str, cell: Cell, label: str, progress: bool,
                log: Callable[[str], None]) -> None:  # fmt: skip
    """Train (or reuse) one cell's run and score it (cached)."""
    m = BY_KEY[cell.method]
    cfg = run_config(out / "runs" / cell.run, cell.data, m, cell.steps, recipe,
                     n_test=preset.n_test, eval_steps=preset.eval_steps)  # fmt: skip
    run = Run.create(cfg)
    todo = run.todo()
    if todo:
        _train(run, todo, label, progress)
    cell.block_steps, cell.train_seconds = _compute(run)
    cell.floor = floor_nll(cell.data, m, out / "floors", preset.floor_samples)
    _evaluate(run, cell, out / "evals" / f"{cell.run}.json", progress)
    log(f"{label}: NLL {cell.nll:.4f} ± {cell.stderr:.4f} "
        f"(floor {cell.floor:.3f}; {cell.block_steps:,} block-steps)")  # fmt: skip


def _curve(out: Path, preset: Preset, recipe: str, data: str, key: str, label: str,
           progress: bool, log: Callable[[str], None]) -> None:  # fmt: skip
    """One method's curve on one data set: trained to growing step targets (one run, extended:
    a constant learning rate makes an extended run the same as a straight one), scored at each."""
    m = BY_KEY[key]
    for steps in preset.curve:
        cfg = run_config(
            out / "curves" / f"{data}_{key}", data, m, steps, recipe,
            n_test=preset.curve_n_test, eval_steps=preset.eval_steps,
        )  # fmt: skip
        run = Run.create(cfg)
        todo = run.unfinished(target=steps)
        if todo:
            _train(run, todo, label, progress)
        cell = Cell(data, key, steps, [], run.path.name)
        path = out / "evals" / f"curve_{data}_{key}_{steps}.json"
        _evaluate(run, cell, path, progress)
        block_steps, train_seconds = _compute(run)
        rec = json.loads(path.read_text())
        rec["curve"] = {"block_steps": block_steps, "train_seconds": train_seconds}
        atomic_write_json(path, rec)
        log(f"{label} {steps} steps/block: NLL {cell.nll:.4f} ± {cell.stderr:.4f}")


def _load_curves(out: Path, preset: Preset) -> list[CurvePoint]:
    """The curve points scored so far (by any process)."""
    points = []
    for data in preset.datasets:
        for key in CURVE_METHODS:
            for steps in preset.curve:
                path = out / "evals" / f"curve_{data}_{key}_{steps}.json"
                rec = json.loads(path.read_text()) if path.exists() else {}
                if "curve" not in rec:
                    continue
                c = rec["curve"]
                points.append(
                    CurvePoint(data, key, steps, c["block_steps"], c["train_seconds"],
                               rec["nll"], rec["stderr"])
                )  # fmt: skip
    return points


def write_results(
    out: Path, preset_name: str, recipe: str, cells: list[Cell], curves: list[CurvePoint]
) -> None:
    """``results.json`` and ``results.md`` (tables beside the paper's numbers)."""
    preset = PRESETS[preset_name]
    atomic_write_json(out / "results.json", {
        "preset": preset_name, "recipe": recipe, "preset_settings": asdict(preset),
        "cells": [asdict(c) | {"excess": c.excess} for c in cells],
        "curves": [asdict(p) for p in curves],
    })  # fmt: skip
    atomic_write_text(out / "results.md", format_tables(preset_name, recipe, cells, curves))
    if curves:
        _plot_curves(out, curves)


def format_tables(
    preset_name: str, recipe: str, cells: list[Cell], curves: list[CurvePoint] | None = None
) -> str:
    """The tables in markdown: per dataset and table, a row per method, a column per budget."""
    preset = PRESETS[preset_name]
    lookup = {(c.data, c.method, b): c for c in cells for b in c.budgets}
    lines = [
        f"Preset `{preset_name}` (recipe `{recipe}`): 1 unit = {preset.unit:,} steps; test NLL "
        f"in nats on {preset.n_test:,} held-out points, RK4 with {preset.eval_steps} steps "
        "(the authors' SA row: 299), exact trace; ± one standard error. Each budget cell: NLL "
        "± s.e. [excess over the row's floor] (steps per network).",
        "",
    ]
    for data in preset.datasets:
        for tid, (title, keys) in TABLES.items():
            keys = [k for k in keys if k in preset.methods]
            if not keys:
                continue
            lines += [f"**{data.upper()} — {title}**", "",
                      "| method | paper | " + " | ".join(BUDGETS) + " | floor (own t0) |",
                      "|---|---|" + "---|" * len(BUDGETS) + "---|"]  # fmt: skip
            for k in keys:
                m = BY_KEY[k]
                paper = m.paper.get(tid, {}).get(data)
                row = [m.label, f"{paper:.2f}" if paper is not None else "-"]
                floor = math.nan
                for b in BUDGETS:
                    c = lookup.get((data, k, b))
                    if c is None or c.nll is None:
                        row.append("-")
                        continue
                    floor = c.floor
                    row.append(f"{c.nll:.3f} ± {c.stderr:.3f} [+{c.excess:.3f}] ({c.steps:,})")
                row.append("-" if math.isnan(floor) else f"{floor:.3f}")
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    if curves:
        lines += ["**NLL against training compute** (SA-DPM and TPSM-10, VP, paper recipe; "
                  "wall-clock as measured on this shared machine, block-steps beside it)", "",
                  "| data | method | steps/block | block-steps | train s | NLL |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for p in curves:
            lines.append(f"| {p.data.upper()} | {BY_KEY[p.method].label} | {p.steps:,} | "
                         f"{p.block_steps:,} | {p.train_seconds:.0f} | "
                         f"{p.nll:.3f} ± {p.stderr:.3f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def _plot_curves(out: Path, curves: list[CurvePoint]) -> None:
    from ..viz import use_agg

    plt = use_agg()
    datasets = sorted({p.data for p in curves})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), dpi=120,
                             squeeze=False)  # fmt: skip
    for ax, data in zip(axes[0], datasets):
        for key, color in (("sa", "tab:blue"), ("tpsm10", "tab:orange")):
            pts = sorted((p for p in curves if p.data == data and p.method == key),
                         key=lambda p: p.block_steps)  # fmt: skip
            if not pts:
                continue
            ax.errorbar([p.block_steps for p in pts], [p.nll for p in pts],
                        yerr=[p.stderr for p in pts], marker="o", color=color, capsize=2,
                        label=BY_KEY[key].label)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("training compute (block-steps, all blocks)")
        ax.set_ylabel("test NLL (nats)")
        ax.set_title(data.upper())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "nll_vs_compute.png")
    plt.close(fig)


def _figures(out: Path, cells: list[Cell], progress: bool) -> None:
    """Density heat maps of every method (its ``per-net`` run) beside the true density."""
    from ..core.ode import PLOT_SOLVER
    from ..runs.inference import load_model
    from ..viz.density import plot_density_comparison
    from ..viz.samples import data_extent

    for data in sorted({c.data for c in cells}):
        chosen = [c for c in cells if c.data == data and "equal per net" in c.budgets
                  and c.nll is not None]  # fmt: skip
        if not chosen:
            continue
        models = {BY_KEY[c.method].key: load_model(out / "runs" / c.run) for c in chosen}
        run = Run.open(out / "runs" / chosen[0].run)
        pts = run.dataset.test_set(20000, run.config.eval.test_seed)
        plot_density_comparison(
            models, run.dataset, out / f"density_{data}.png", extent=data_extent(pts),
            solver=PLOT_SOLVER, data_points=pts, progress=progress,
            title=f"{data.upper()}: ODE densities (RK4 100 steps), equal steps per network",
        )  # fmt: skip


__all__ = ["BUDGETS", "METHODS", "PRESETS", "Cell", "Method", "Preset", "plan", "reproduce",
           "steps_per_block"]  # fmt: skip
