"""Split points from measurements (``partition.kind: auto``; psm.auto.splits)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from helpers import run_cli
from psm.auto.splits import cell_terms, choose_splits, place_splits, resolve
from psm.errors import PSMError
from psm.executors import make_executor
from psm.runs.config import BudgetConfig, config_hash, validate_config
from psm.runs.run import Run
from test_likelihood import GaussianMixture, exact_model


def _log_edges(t0: float, n: int) -> list[float]:
    edges = [math.exp(math.log(t0) * (1 - i / n)) for i in range(n + 1)]
    edges[-1] = 1.0
    return edges


def test_an_even_fall_gives_splits_even_in_log_t():
    edges = _log_edges(1e-4, 40)
    got = place_splits(edges, [1.0] * 40, 4)
    want = [float(f"{10 ** (-4 + k):.3g}") for k in (1, 2, 3)]
    assert got == pytest.approx([0.0, *want, 1.0], rel=1e-9)


def test_the_boundaries_crowd_where_the_pilot_still_fell():
    edges = _log_edges(1e-4, 40)
    fall = [0.0] * 40
    fall[5] = 10.0  # only the 6th cell still learns (negative falls count as nothing)
    fall[30] = -3.0
    got = place_splits(edges, fall, 5)
    inside = [s for s in got[1:-1] if edges[5] <= s <= edges[6] * 1.01]
    assert len(inside) >= 3
    assert all(a < b for a, b in itertools.pairwise(got))
    assert all(float(f"{s:.3g}") == s for s in got)  # 3 significant digits
    assert place_splits(edges, fall, 1) == [0.0, 1.0]


def test_the_cell_terms_of_the_exact_score_are_the_known_constant():
    """Gaussian data N(0, s² I): the conditional-score term of the exact score is, per unit
    time, ½ g² d (1/σ² - 1/(α² s² + σ²)) — the constant the estimate carries."""
    s2, d = 0.5, 2
    dist = GaussianMixture([1.0], [[0.0, 0.0]], [[[s2, 0.0], [0.0, s2]]])
    cfg = validate_config({"process": {"name": "vp"}})
    process = cfg.process.build()
    model = exact_model(dist, process)
    x0 = torch.randn(20000, d, generator=torch.Generator().manual_seed(1)) * math.sqrt(s2)
    edges = _log_edges(1e-3, 6)
    got = cell_terms(model, x0, edges, seed=3)
    for (lo, hi), value in zip(itertools.pairwise(edges), got):
        t = math.sqrt(lo * hi)
        c = process.schedule(torch.tensor(t, dtype=torch.float64))
        a, s, g2 = float(c.alpha), float(c.sigma), float(c.g2)
        want = 0.5 * g2 * t * math.log(hi / lo) * d * (1 / s**2 - 1 / (a * a * s2 + s**2))
        assert value == pytest.approx(want, rel=0.05)


def _auto_cfg(tmp_path, name="r", blocks=3, **extra):
    raw = {
        "name": name, "out": str(tmp_path / name), "data": {"name": "ty"},
        "partition": {"kind": "auto", "blocks": blocks, "pilot_steps": 40},
        "net": {"name": "mlp", "hidden": [16]},
        "train": {"batch_size": 32, "log_every": 20, "heldout_points": 32, **extra},
        "executor": {"name": "local", "workers": 1}, "eval": {"n_test": 64, "steps": 10},
    }  # fmt: skip
    return validate_config(raw)


class Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def run(self, run, blocks):
        self.calls += 1
        return self.inner.run(run, blocks)


def test_a_pilot_chooses_recorded_splits_and_a_repeated_call_reuses_them(tmp_path):
    cfg = _auto_cfg(tmp_path)
    ex = Counting(make_executor("local", cfg))
    choice = choose_splits(cfg, ex, log=lambda line: None)
    assert ex.calls == 2  # the pilot's two halves
    assert choice.splits[0] == 0.0 and choice.splits[-1] == 1.0 and len(choice.splits) == 4
    assert all(a < b for a, b in itertools.pairwise(choice.splits))
    assert (tmp_path / "r-pilot" / "splits.json").exists()
    pilot = Run.open(tmp_path / "r-pilot")
    assert pilot.num_blocks == 1 and pilot.ledger.status(0).step == 40
    again = Counting(make_executor("local", cfg))
    assert choose_splits(cfg, again, log=lambda line: None).splits == choice.splits
    assert again.calls == 0
    resolved = resolve(cfg, choice)
    assert resolved.partition.kind == "splits" and "40-step" in resolved.partition.chosen_by
    hand = validate_config({**resolved.model_dump(mode="json"),
                            "partition": {"kind": "splits", "splits": choice.splits}})  # fmt: skip
    assert config_hash(hand) != config_hash(resolved)  # provenance is part of the problem
    with pytest.raises(PSMError, match="auto"):
        Run.create(cfg)


def test_psm_train_auto_partition_with_a_budget(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data: {name: ty}\npartition: {kind: auto, blocks: 2, pilot_steps: 40}\n"
        "net: {name: mlp, hidden: [16]}\n"
        "train: {batch_size: 32, log_every: 20, heldout_points: 32}\n"
        "executor: {name: local, workers: 1}\n"
    )
    out = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "train", cfg, "--out", out, "--budget", "300", "--dry-run")
    assert code == 0 and "placeholders" in stdout and "# budget: 300" in stdout
    assert not out.exists()
    code, _, err = run_cli(capsys, "train", cfg, "--out", out, "--budget", "300", "--no-plot",
                           "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "auto partition: 2 blocks at" in err and "budget spent: 260 of 260" in err  # 40 pilot
    run = Run.open(out)
    assert run.config.partition.kind == "splits" and run.num_blocks == 2


def test_the_pilot_grows_with_a_block_step_budget_unless_set():
    from psm.auto.splits import PILOT_STEPS, pilot_steps_of

    def cfg(**part):
        raw = {"data": {"name": "ty"}, "partition": {"kind": "auto", "blocks": 3, **part}}
        return validate_config(raw)

    assert pilot_steps_of(cfg()) == PILOT_STEPS
    big = cfg().model_copy(deep=True)
    big.train.budget = BudgetConfig(total=1_360_000)
    assert pilot_steps_of(big) == 27_200  # 2% of the budget
    big.train.budget = BudgetConfig(total=100_000)
    assert pilot_steps_of(big) == PILOT_STEPS  # never below the default
    big.train.budget = BudgetConfig(total="1h")
    assert pilot_steps_of(big) == PILOT_STEPS  # a time budget's steps are not known yet
    set_ = cfg(pilot_steps=500).model_copy(deep=True)
    set_.train.budget = BudgetConfig(total=1_360_000)
    assert pilot_steps_of(set_) == 500
