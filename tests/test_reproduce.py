"""psm reproduce: the budgets, the floors, and the tiny preset end to end (resumable)."""

from __future__ import annotations

import json

import pytest

from helpers import one_line_error, run_cli
from psm.experiments.catalogue import BY_KEY, CURVE_METHODS, PRESETS, run_config, steps_per_block
from psm.experiments.floors import floor_nll
from psm.experiments.plan import cell_cost, curve_cost, plan, plan_rows


def test_budgets_follow_the_papers_ratio_total_compute_and_steps_per_network():
    sa, tpsm_b, tpsm_c = BY_KEY["sa"], BY_KEY["tpsm_b"], BY_KEY["tpsm_c"]
    assert [steps_per_block(sa, b, 100) for b in ("paper ratio", "equal total",
                                                  "equal per net")] == [400, 400, 400]  # fmt: skip
    assert steps_per_block(tpsm_b, "paper ratio", 100) == 100  # 500k vs SA's 2M
    assert steps_per_block(tpsm_b, "equal total", 100) * 4 == 400
    assert steps_per_block(tpsm_c, "equal total", 100) * 200 == 400
    assert steps_per_block(tpsm_c, "equal per net", 100) == 400
    cells = plan(PRESETS["small"])
    sa_cells = [c for c in cells if c.method == "sa" and c.data == "ty"]
    assert len(sa_cells) == 1 and len(sa_cells[0].budgets) == 3  # one run serves all three
    b_cells = {c.steps: c.budgets for c in cells if c.method == "tpsm_b" and c.data == "hg"}
    assert b_cells == {150: ["paper ratio", "equal total"], 600: ["equal per net"]}


def test_the_psm_recipe_keeps_each_methods_problem_and_changes_only_the_training(tmp_path):
    paper = run_config(tmp_path, "ty", BY_KEY["tpsm_b"], 5000, "paper", n_test=10, eval_steps=4)
    psm = run_config(tmp_path, "ty", BY_KEY["tpsm_b"], 5000, "psm", n_test=10, eval_steps=4)
    assert psm.partition == paper.partition and psm.process == paper.process
    assert (paper.net.input_scale, psm.net.input_scale) == (1.0, 30.0)
    assert (psm.train.lr, psm.train.lr_schedule, psm.train.warmup) == (3e-3, "cosine", 100)
    assert (paper.train.lr, paper.train.lr_schedule, paper.train.warmup) == (1e-3, "constant", 0)


def test_floors_of_each_t0_match_the_mixtures(tmp_path):
    cache = tmp_path / "floors"
    assert floor_nll("ty", BY_KEY["sa"], cache, 200_000) == pytest.approx(0.475, abs=0.01)
    assert floor_nll("hg", BY_KEY["sa"], cache, 200_000) == pytest.approx(0.955, abs=0.01)
    # the authors' SA script starts at t0 = 0.01 with b(t) = 12 t: a higher floor
    assert floor_nll("ty", BY_KEY["sa_authors"], cache, 200_000) == pytest.approx(0.587, abs=0.01)
    assert floor_nll("hg", BY_KEY["sa_authors"], cache, 200_000) == pytest.approx(1.052, abs=0.01)
    assert len(list(cache.glob("*.json"))) == 4


def test_tiny_preset_end_to_end_and_resumable(tmp_path, capsys):
    out = tmp_path / "rep"
    # --plan first: every run to do, its block-steps, nothing written
    code, text, _ = run_cli(capsys, "reproduce", "--preset", "tiny", "--out", out, "--plan")
    assert code == 0 and not out.exists()
    rows = plan_rows(out, "tiny")
    assert all(r.state == "to do" and r.evaluations_left == 1 for r in rows)
    want = sum(BY_KEY[c.method].networks * c.steps for c in plan(PRESETS["tiny"]))
    assert sum(r.block_steps_left for r in rows) == want
    assert f"left: {want:,} block-steps and {len(rows)} evaluations" in text
    code, stdout, err = run_cli(capsys, "reproduce", "--preset", "tiny", "--out", out,
                                "--threads", 2, "--no-progress")  # fmt: skip
    assert code == 0, err
    # two data sets, two threads: one child process per data set, one thread each
    assert "ty: one process, 1 thread(s)" in err and "hg: one process, 1 thread(s)" in err
    res = json.loads((out / "results.json").read_text())
    cells = res["cells"]
    assert {c["method"] for c in cells} == set(PRESETS["tiny"].methods)
    assert {c["data"] for c in cells} == {"ty", "hg"}
    assert all(c["nll"] is not None and c["stderr"] > 0 and c["floor"] > 0.4 for c in cells)
    table = (out / "results.md").read_text()
    assert "| SA-DPM | 0.76 |" in table and "TPSM_A" in table and "Table 11" in table
    assert stdout.strip().startswith("Preset `tiny`")
    # a second call trains nothing and evaluates nothing again
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert run_cli(capsys, "reproduce", "--preset", "tiny", "--out", out, "--threads", 1,
                   "--no-progress")[0] == 0  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamp
    assert json.loads((out / "results.json").read_text())["cells"] == cells
    rows = plan_rows(out, "tiny")
    assert all(r.state == "scored" and r.block_steps_left == 0 for r in rows)
    # every score is an ordinary NLL record in its run's nll.jsonl, one per run
    logs = sorted(out.glob("runs/*/nll.jsonl"))
    assert [p.parent.name for p in logs] == sorted(c["run"] for c in cells)
    assert all(len(p.read_text().splitlines()) == 1 for p in logs)
    assert not (out / "evals").exists()
    # --report on a preset stopped part way: the scored cells, "-" for the rest, nothing trained
    (out / "runs" / "hg_tpsm_a_10" / "nll.jsonl").unlink()
    (out / "results.md").unlink()
    code, stdout, err = run_cli(capsys, "reproduce", "--preset", "tiny", "--out", out, "--report")
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamp
    assert not (out / "runs" / "hg_tpsm_a_10" / "nll.jsonl").exists()
    again = json.loads((out / "results.json").read_text())["cells"]
    assert again == [c for c in cells if c["run"] != "hg_tpsm_a_10"]
    hg_a = [ln for ln in (out / "results.md").read_text().splitlines()
            if ln.startswith("| TPSM_A")][1]  # fmt: skip
    assert hg_a.split("|")[3].strip() == "-"  # its paper-ratio cell
    assert hg_a.count(" - |") == 1


def test_runs_go_cheapest_first_in_the_plans_order(tmp_path, monkeypatch):
    # an interrupted full preset should have filled as many table cells as its time allowed
    import psm.experiments.reproduce as rep

    order: list[str] = []
    labels: list[str] = []

    def score_cell(out, preset, recipe, cell, label, *args):
        order.append(cell.run)
        labels.append(label)

    def curve(out, preset, recipe, data, key, label, *args):
        order.append(f"{data}_{key}")
        labels.append(label)

    monkeypatch.setattr(rep, "_score_cell", score_cell)
    monkeypatch.setattr(rep, "_curve", curve)
    monkeypatch.setattr(rep, "write_results", lambda *a, **k: None)
    monkeypatch.setattr(rep, "figures", lambda *a, **k: None)
    rep.reproduce(tmp_path, "full", datasets=("hg",), progress=False, log=lambda line: None)
    rows = plan_rows(tmp_path, "full", datasets=("hg",))
    assert order == [r.run for r in rows]  # --plan lists the runs in the order they go
    preset = PRESETS["full"]
    costs = {c.run: cell_cost(preset, c) for c in plan(preset) if c.data == "hg"}
    costs |= {f"hg_{k}": curve_cost(preset, k) for k in CURVE_METHODS}
    assert [costs[r] for r in order] == sorted(costs[r] for r in order)
    # the authors' SA row (299 RK4 steps) is the cheapest; 200 blocks x 8000 steps the dearest
    assert order[0] == "hg_sa_authors_8000" and order[-1] == "hg_tpsm_c_8000"
    n = len(order)
    assert labels[0] == f"[1/{n}] hg_sa_authors_8000" and labels[-1] == f"[{n}/{n}] hg_tpsm_c_8000"
    assert "curve hg sa" in labels[order.index("hg_sa")]


def test_runs_names_runs_with_or_without_their_data_set(tmp_path, monkeypatch):
    # finishing a preset's last runs: --runs tpsm_c_8000 on both sets, hg_sa the HG SA curve
    import psm.experiments.reproduce as rep

    order: list[str] = []
    monkeypatch.setattr(
        rep, "_score_cell", lambda out, preset, recipe, cell, *a: order.append(cell.run)
    )
    monkeypatch.setattr(
        rep, "_curve", lambda out, preset, recipe, data, key, *a: order.append(f"{data}_{key}")
    )
    monkeypatch.setattr(rep, "write_results", lambda *a, **k: None)
    monkeypatch.setattr(rep, "figures", lambda *a, **k: None)
    runs = ("tpsm_c_8000", "hg_sa")
    rep.reproduce(tmp_path, "full", runs=runs, progress=False, log=lambda line: None)
    assert order == ["hg_sa", "ty_tpsm_c_8000", "hg_tpsm_c_8000"]
    assert sorted(r.run for r in plan_rows(tmp_path, "full", runs=runs)) == sorted(order)


def test_runs_trains_and_scores_only_the_named_runs(tmp_path, capsys):
    out = tmp_path / "rep"
    # two data sets named: one child process each, given only the names that are its own
    code, _, err = run_cli(capsys, "reproduce", "--preset", "tiny", "--out", out, "--threads", 2,
                           "--runs", "sa_40,hg_tpsm_a_10", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "ty: one process" in err and "hg: one process" in err
    assert {p.parent.name for p in (out / "runs").glob("*/nll.jsonl")} == {
        "ty_sa_40", "hg_sa_40", "hg_tpsm_a_10"
    }  # fmt: skip
    assert {p.name for p in (out / "runs").iterdir()} == {"ty_sa_40", "hg_sa_40", "hg_tpsm_a_10"}
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert sorted(c["run"] for c in cells) == ["hg_sa_40", "hg_tpsm_a_10", "ty_sa_40"]
    code, text, _ = run_cli(capsys, "reproduce", "--preset", "tiny", "--out", out, "--plan",
                            "--runs", "tpsm_a_10")  # fmt: skip
    assert code == 0
    rows = [ln.split()[0] for ln in text.splitlines()[1:-1]]
    assert rows == ["ty_tpsm_a_10", "hg_tpsm_a_10"] and "scored" in text and "to do" in text


def test_a_curve_stopped_short_of_its_steps_is_not_scored(tmp_path, monkeypatch):
    # Ctrl-C mid-curve: scoring the part-trained run would cache a wrong curve point
    import dataclasses
    from types import SimpleNamespace

    import psm.experiments.harness as harness
    import psm.experiments.reproduce as rep

    monkeypatch.setattr(
        harness, "train_ensemble", lambda run, todo: [SimpleNamespace(state="stopped")]
    )
    preset = dataclasses.replace(PRESETS["tiny"], curve=(10,))
    with pytest.raises(KeyboardInterrupt):
        rep._curve(tmp_path, preset, "paper", "ty", "sa", "curve", False, lambda line: None)
    assert not list(tmp_path.rglob("nll.jsonl"))


def test_a_row_with_nothing_scored_shows_dashes_not_nan():
    from psm.experiments.report import format_tables

    text = format_tables("tiny", "paper", [])
    rows = [ln for ln in text.splitlines() if ln.startswith("| SA-DPM |")]
    assert rows[0] == "| SA-DPM | 0.76 | - | - | - | - |"  # TY, Table 1: three budgets, floor
    assert "nan" not in text


def test_bad_flags_are_one_line(tmp_path, capsys):
    one_line_error(capsys, "reproduce", "--preset", "huge", "--out", tmp_path / "r",
                   match="--preset 'huge'")  # fmt: skip
    one_line_error(capsys, "reproduce", "--recipe", "magic", "--out", tmp_path / "r",
                   match="--recipe 'magic'")  # fmt: skip
    one_line_error(capsys, "reproduce", "--out", tmp_path / "r", "--report",
                   match="nothing scored")  # fmt: skip
    one_line_error(capsys, "reproduce", "--preset", "tiny", "--out", tmp_path / "r", "--runs",
                   "sa_41", match="--runs 'sa_41': no such run")  # fmt: skip
    one_line_error(capsys, "reproduce", "--preset", "tiny", "--out", tmp_path / "r", "--data",
                   "ty", "--runs", "hg_sa_40", match="no such run")  # fmt: skip
    assert not (tmp_path / "r").exists()
