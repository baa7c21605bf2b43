"""The paper's 2D experiments as data: its methods (the table rows), the three training budgets,
the presets (how big a reproduction is), the training recipes, and the run config of a cell.

Each method is trained under three budgets:

* ``paper ratio``: the paper's ratio of steps per network — the authors' scripts train SA-DPM for
  2,000,000 steps and every TPSM block for 500,000, so SA gets 4 units and a block 1 unit;
* ``equal total``: equal total compute (block-steps summed over the blocks: what one machine sees),
  4 units for every method, split over its blocks;
* ``equal per net``: equal steps per network (the parallel view: wall-clock is one block's time when
  every block has its own worker), 4 units per network.

One unit is the preset's ``unit`` steps (:data:`PRESETS`).

The authors' SA-DPM scripts use b(t) = 12 t, start the likelihood at t0 = 0.01 and integrate
with 299 RK4 steps, unlike their TPSM scripts (b(t) = 10 t, t0 = 1e-4). Both SA rows are in the
catalogue (``SA-DPM`` with the paper's settings, ``SA-DPM (authors' script)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runs.config import PartitionConfig, RunConfig, validate_config

DATASETS = ("ty", "hg")
PAPER_SA_STEPS, PAPER_BLOCK_STEPS = 2_000_000, 500_000  # the authors' scripts


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
    """

    key: str
    label: str
    process: dict[str, Any]
    partition: dict[str, Any]
    paper: dict[str, dict[str, float]]
    eval_steps: int | None = None

    @property
    def networks(self) -> int:
        """K, the number of networks: the partition section's own count (any ``kind``)."""
        return PartitionConfig(**self.partition).build().num_blocks


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

CURVE_METHODS = ("sa", "tpsm10")
"""The methods whose NLL is scored against training compute (a preset's ``curve``)."""


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
        eval_steps: steps of the NLL's ODE solver over ``[t0, 1]``.
        datasets: which data sets.
        methods: which rows (default all).
        curve: per-block step targets at which SA-DPM and TPSM-10 are scored for the curves of
            NLL against training compute (empty: no curves).
        curve_n_test: held-out points per curve point.
        figures: density heat maps of every method (budget ``equal per net``) beside the truth.
        floor_samples: data samples of the Monte Carlo floor (its s.e. is about 1/sqrt of it).
        eval_solver: the NLL's ODE solver (the paper's: RK4), written to each run's
            ``eval.solver``.
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
    eval_solver: str = "rk4"


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


def run_config(
    out: Path,
    data: str,
    method: Method,
    steps: int,
    recipe: str,
    *,
    n_test: int,
    eval_steps: int,
    eval_solver: str = "rk4",
) -> RunConfig:
    """The psm config of one cell: ``method`` on ``data`` for ``steps`` per block under
    ``recipe``, scored on ``n_test`` points by ``eval_solver`` with ``eval_steps`` steps (the
    method's own ``eval_steps`` win)."""
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
            "eval": {
                "n_test": n_test,
                "steps": method.eval_steps or eval_steps,
                "solver": eval_solver,
            },
        }
    )
