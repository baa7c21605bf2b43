"""The experiments package: the catalogue's partitions, the harness honouring a run's eval
settings, its scores as ``psm nll`` records, and reproduce folders scored before them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from helpers import run_cli, tiny_config
from psm.experiments import harness, legacy
from psm.experiments.catalogue import BY_KEY, METHODS, PRESETS, Method, run_config
from psm.experiments.plan import Cell, cell_config, curve_config, plan_rows
from psm.runs.config import PartitionConfig, validate_config
from psm.runs.nll_records import IDENTITY, NLL_LOG, read_records
from psm.runs.run import Run

# ------------------------------------------------------------------ catalogue


def test_networks_come_from_the_partitions_own_builder_for_every_kind(tmp_path):
    geo = Method("geo", "TPSM, geometric", BY_KEY["sa"].process,
                 {"kind": "geometric", "blocks": 6, "first": 0.01, "t0": 1e-4}, {})  # fmt: skip
    assert geo.networks == 6
    from psm.experiments.catalogue import steps_per_block

    assert steps_per_block(geo, "equal total", 30) == 20 and steps_per_block(geo, "paper ratio",
                                                                              30) == 30  # fmt: skip
    cfg = run_config(tmp_path, "ty", geo, 20, "paper", n_test=10, eval_steps=4)
    assert cfg.partition.build().num_blocks == geo.networks
    for m in METHODS:
        assert m.networks == PartitionConfig(**m.partition).build().num_blocks
    assert [BY_KEY[k].networks for k in ("sa", "tpsm_a", "tpsm_b", "tpsm_c", "dpsm")] == [
        1, 2, 4, 200, 100,
    ]  # fmt: skip


def test_the_presets_keep_the_papers_solver_in_each_runs_eval_section(tmp_path):
    # the numbers psm reproduce produces: RK4, the preset's steps (the authors' SA row: 299)
    for name, preset in PRESETS.items():
        assert preset.eval_solver == "rk4", name
        for cell in (Cell("ty", "sa", 40, [], "ty_sa_40"), Cell("ty", "sa_authors", 40, [], "a")):
            ev = cell_config(tmp_path, preset, "paper", cell).eval
            want = 299 if cell.method == "sa_authors" else preset.eval_steps
            assert (ev.solver, ev.steps, ev.n_test, ev.test_seed) == (
                "rk4", want, preset.n_test, 12345
            )  # fmt: skip
    euler = dataclasses.replace(PRESETS["tiny"], eval_solver="euler")
    assert cell_config(tmp_path, euler, "paper", Cell("ty", "sa", 40, [], "r")).eval.solver == (
        "euler"
    )


# ------------------------------------------------------------------ the harness


def _trained(tmp_path, name="r", **eval_section) -> Run:
    raw = tiny_config(name=name, out=str(tmp_path / name), train={"steps": 5},
                      eval={"n_test": 64, **eval_section})  # fmt: skip
    run = Run.create(validate_config(raw))
    harness.train(run, run.ledger.not_done(invocation=True), label="t", progress=False)
    assert not run.ledger.not_done()
    return run


def test_evaluate_honours_the_runs_eval_solver(tmp_path):
    from psm.core.ode import SolverSettings
    from psm.experiments.reproduce import _evaluate
    from psm.runs.inference import evaluate_run

    run = _trained(tmp_path, solver="euler", steps=6)
    cell = Cell("ty", "sa", 5, [], run.path.name)
    score = _evaluate(run, cell, tmp_path / "evals" / "r.json", False)
    assert score is not None and (score.solver, score.steps) == ("euler", 6)
    assert (cell.eval_steps, cell.n) == (6, 64)
    rec = read_records(run.path)[-1]
    assert (rec["solver"], rec["steps"], rec["rtol"]) == ("euler", 6, None)
    euler = evaluate_run(run, solver=SolverSettings("euler", 6), batch_size=harness.BATCH_SIZE,
                         progress=False).result.nll  # fmt: skip
    rk4 = evaluate_run(run, solver=SolverSettings("rk4", 6), batch_size=harness.BATCH_SIZE,
                       progress=False).result.nll  # fmt: skip
    assert cell.nll == euler != rk4
    # an adaptive solver: its tolerances come from the same section, and are recorded
    dopri = _trained(tmp_path, "d", solver="dopri5", rtol=1e-3, atol=1e-4)
    rec = harness.evaluate(dopri, progress=False).record
    assert rec is not None
    assert (rec["solver"], rec["steps"], rec["rtol"], rec["atol"]) == ("dopri5", None, 1e-3, 1e-4)


def test_scores_are_psm_nll_records_and_serve_as_its_cache(tmp_path, capsys):
    run = _trained(tmp_path, steps=8)
    # psm nll with the harness's settings: its record is the harness's score
    code, _, err = run_cli(capsys, "nll", run.path, "--batch-size", harness.BATCH_SIZE, "--device",
                           "cpu", "--no-progress", "--json", tmp_path / "n.json")  # fmt: skip
    assert code == 0, err
    by_cli = json.loads((tmp_path / "n.json").read_text())
    assert {k: by_cli[k] for k in IDENTITY} == harness.evaluation_key(run)
    cached = harness.cached_score(run)
    assert cached is not None and cached.record == by_cli
    assert harness.score(run, progress=False).nll == by_cli["nll"]
    assert len(read_records(run.path)) == 1  # nothing scored again
    # the harness writes the very same format: same fields, same identity, same number
    mine = harness.evaluate(run, progress=False).record
    assert mine is not None
    assert set(mine) == set(by_cli)
    assert {k: mine[k] for k in IDENTITY} == {k: by_cli[k] for k in IDENTITY}
    assert mine["nll"] == pytest.approx(by_cli["nll"], abs=1e-6)
    assert [r["nll"] for r in read_records(run.path)] == [by_cli["nll"], mine["nll"]]
    lines = (run.path / NLL_LOG).read_text().splitlines()
    assert json.loads(lines[-1]) == mine
    # other settings, or weights trained further, are another evaluation
    assert harness.cached_score(run, batch_size=1000) is None
    longer = Run.create(run.config.model_copy(
        update={"train": run.config.train.model_copy(update={"steps": 7})}))  # fmt: skip
    harness.train(longer, longer.ledger.not_done(invocation=True), label="t", progress=False)
    assert harness.cached_score(longer) is None
    assert harness.cached_score(longer, current=False) is None  # another step target too


# ------------------------------------------------------------------ folders scored before


def _old_cache_file(path, run: Run, nll: float, curve: dict | None = None) -> None:
    """A score file exactly as psm reproduce wrote it under <out>/evals/ before scores went to
    nll.jsonl (``_evaluate`` and ``_curve`` of that version)."""
    ev = run.config.eval
    key = {"n": ev.n_test, "steps": ev.steps, "seed": ev.test_seed, "hash": run.hash}
    rec = {"key": key, "nll": nll, "stderr": 0.0984, "n": ev.n_test, "steps": ev.steps,
           "seconds": 0.13}  # fmt: skip
    if curve is not None:
        rec["curve"] = curve
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")


def test_a_folder_scored_before_reports_and_plans_without_scoring_again(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "rep"
    preset = dataclasses.replace(PRESETS["tiny"], curve=(5, 10), curve_n_test=64)
    monkeypatch.setitem(PRESETS, "tiny", preset)
    # a cell and a curve trained and scored by the old version
    cell = Cell("ty", "sa", 40, [], "ty_sa_40")
    run = Run.create(cell_config(out, preset, "paper", cell))
    harness.train(run, run.ledger.not_done(invocation=True), label="t", progress=False)
    _old_cache_file(legacy.cell_path(out, "ty_sa_40"), run, 2.14742174744606)
    for steps, nll in ((5, 3.44), (10, 2.69)):
        curve = Run.create(curve_config(out, preset, "paper", "ty", "sa", steps))
        harness.train(curve, curve.ledger.not_done(invocation=True), label="t", progress=False)
        compute = {"block_steps": steps, "train_seconds": 0.1 * steps}
        _old_cache_file(legacy.curve_path(out, "ty", "sa", steps), curve, nll, compute)
    # a cell whose old file holds other settings (another n_test) is not scored
    other = Cell("ty", "tpsm_a", 10, [], "ty_tpsm_a_10")
    orun = Run.create(cell_config(out, preset, "paper", other))
    harness.train(orun, orun.ledger.not_done(invocation=True), label="t", progress=False)
    _old_cache_file(legacy.cell_path(out, "ty_tpsm_a_10"), orun, 9.9)
    stale = json.loads(legacy.cell_path(out, "ty_tpsm_a_10").read_text())
    stale["key"]["n"] += 1
    legacy.cell_path(out, "ty_tpsm_a_10").write_text(json.dumps(stale))

    def no_scoring(*a, **k):
        raise AssertionError("scored again")

    monkeypatch.setattr(harness, "evaluate", no_scoring)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    # --plan: the old scores count
    rows = {r.run: r for r in plan_rows(out, "tiny", datasets=("ty",))}
    assert rows["ty_sa_40"].state == "scored" and rows["ty_sa_40"].evaluations_left == 0
    assert rows["ty_sa"].evaluations_left == 0 and rows["ty_sa"].state == "scored"
    assert rows["ty_tpsm_a_10"].state == "trained" and rows["ty_tpsm_a_10"].evaluations_left == 1
    code, text, err = run_cli(capsys, "reproduce", "--preset", "tiny", "--out", out, "--plan",
                              "--data", "ty")  # fmt: skip
    assert code == 0, err
    assert [ln.split()[-1] for ln in text.splitlines() if ln.startswith("ty_sa")] == [
        "scored", "scored"
    ]  # fmt: skip
    # --report: the tables from the old scores, nothing trained or scored
    code, stdout, err = run_cli(capsys, "reproduce", "--preset", "tiny", "--out", out, "--report")
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert [(c["run"], c["nll"], c["eval_steps"]) for c in res["cells"]] == [
        ("ty_sa_40", 2.14742174744606, 20)
    ]  # fmt: skip
    assert [(p["steps"], p["block_steps"], p["nll"]) for p in res["curves"]] == [
        (5, 5, 3.44), (10, 10, 2.69)
    ]  # fmt: skip
    assert "| SA-DPM | 0.76 | 2.147 ± 0.098" in stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamp
    assert not list(out.rglob(NLL_LOG))
    # an ordinary call on the old folder trains and scores nothing it holds
    from psm.experiments.reproduce import reproduce

    cells = reproduce(out, "tiny", datasets=("ty",), runs=("ty_sa_40", "ty_sa"), progress=False,
                      log=lambda line: None)  # fmt: skip
    assert next(c for c in cells if c.run == "ty_sa_40").nll == 2.14742174744606
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamp
    assert not list(out.rglob(NLL_LOG))


def test_the_floor_needs_data_with_exact_marginals():
    from psm.data import Dataset, make_dataset
    from psm.data.base import DataError
    from psm.data.exact import nll_floor

    ty = make_dataset("ty")
    assert nll_floor(ty, 1.0, 0.0, samples=20000, seed=0) == pytest.approx(ty.entropy, abs=0.02)

    class NoDensity(Dataset):
        name = "bare"

        def sample(self, n, generator):
            raise AssertionError

    with pytest.raises(DataError, match="no exact marginal density"):
        nll_floor(NoDensity(), 1.0, 0.1, samples=10, seed=0)
