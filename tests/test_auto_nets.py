"""Each block's net and objective from a race of candidates (``train.budget.candidates``;
psm.auto.nets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli
from psm.auto.budget import read_plan, train_budget
from psm.auto.nets import (
    RACE_STEPS,
    choose_nets,
    chosen_blocks,
    pick,
    race_steps_of,
    resolve_nets,
)
from psm.errors import PSMError
from psm.runs.config import Candidate, config_hash, validate_config
from psm.runs.run import Run
from psm.training.train import BlockOutcome


def test_each_block_keeps_its_lowest_term_and_ties_go_to_the_earlier_candidate():
    terms = [[1.0, 2.0, 3.0, 5.0], [0.5, 2.5, 3.0, 4.0]]
    assert pick(terms) == [1, 0, 0, 1]


def test_neighbouring_blocks_with_one_candidate_share_an_entry_and_the_runs_own_has_none():
    wide, lw = Candidate(net={"hidden": [32]}), Candidate(objective={"name": "likelihood"})
    cands = [Candidate(), wide, lw]
    got = chosen_blocks(cands, [1, 1, 0, 2, 1], "race")
    assert got == [
        {"first": 0, "last": 1, "chosen_by": "race", "net": {"hidden": [32]}},
        {"first": 3, "last": 3, "chosen_by": "race", "objective": {"name": "likelihood"}},
        {"first": 4, "last": 4, "chosen_by": "race", "net": {"hidden": [32]}},
    ]


def _cfg(tmp_path, name="run", total=40_000, candidates=None, **budget):
    cands = candidates if candidates is not None else [{}, {"net": {"hidden": [32]}}]
    raw = {
        "name": name, "out": str(tmp_path / name), "data": {"name": "ty"},
        "partition": {"kind": "equal", "blocks": 4}, "net": {"name": "mlp", "hidden": [8]},
        "train": {"budget": {"total": total, "chunk": 0.05, "candidates": cands, **budget},
                  "lr_schedule": "cosine"},
        "executor": {"name": "local", "workers": 2},
    }  # fmt: skip
    return validate_config(raw)


def test_the_race_shares_its_share_of_a_block_step_budget_and_a_time_budget_gets_a_constant(
    tmp_path,
):
    assert race_steps_of(_cfg(tmp_path, total=1_360_000)) == 17_000  # 0.1 x 1.36M / (2 x 4)
    assert race_steps_of(_cfg(tmp_path, total=1_360_000, race=0.05)) == 8_500
    assert race_steps_of(_cfg(tmp_path, total="1h")) == RACE_STEPS


def test_candidates_are_checked_when_the_config_is_read(tmp_path):
    with pytest.raises(ValueError, match="two or more"):
        _cfg(tmp_path, candidates=[{"net": {"hidden": [4]}}])
    with pytest.raises(ValueError, match=r"train\.budget\.candidates\[1\]\.net"):
        _cfg(tmp_path, candidates=[{}, {"net": {"hiddn": [4]}}])
    raw = _cfg(tmp_path).model_dump(mode="json")
    raw["blocks"] = [{"first": 0, "net": {"hidden": [4]}}]  # a hand-set block beside the race
    with pytest.raises(ValueError, match="drop blocks"):
        validate_config(raw)


def test_candidates_are_hashed_and_a_budget_without_them_keeps_its_hash(tmp_path):
    a = _cfg(tmp_path)
    b = _cfg(tmp_path, candidates=[{}, {"net": {"hidden": [64]}}])
    raw = a.model_dump(mode="json")
    raw["train"]["budget"].pop("candidates")
    plain = validate_config(raw)
    raw["train"]["budget"].pop("race")
    assert config_hash(a) != config_hash(b)
    assert config_hash(plain) == config_hash(validate_config(raw))  # race: default, not hashed


class RaceExecutor:
    """Trains nothing: marks each block done at its target and logs a held-out term that
    depends on the block and on its net's width (``terms[width][block]``)."""

    def __init__(self):
        self.calls = 0
        self.terms = {8: [1.0, 1.0, 0.2, 0.7], 32: [0.5, 0.8, 0.3, 0.7]}

    def run(self, run: Run, blocks):
        self.calls += 1
        outs = []
        for b in blocks:
            target = run.config.step_target(b)
            width = run.config.net_for(b).hidden[0]
            term = self.terms[width][b] / (1 + target) ** 0.1
            run.layout.weights(b).write_bytes(b"w")
            with run.layout.metrics(b).open("a") as f:
                f.write(json.dumps({"step": target, "heldout": term}) + "\n")
            run.ledger.write(b, state="done", step=target, target=target)
            outs.append(BlockOutcome(b, "done", target))
        return outs


def test_the_race_gives_each_block_its_best_candidate_and_the_budget_pays_for_it(tmp_path):
    cfg = _cfg(tmp_path)
    fake = RaceExecutor()
    race = choose_nets(cfg, fake, log=lambda line: None)
    assert race.steps == 500 and race.block_steps == 4_000  # 0.1 x 40,000
    assert race.choice == [1, 1, 0, 0]  # block 3 ties: the earlier candidate, the run's own
    assert fake.calls == 2  # one race run per candidate, every block in it
    chosen = resolve_nets(cfg, race)
    assert [chosen.net_for(b).hidden for b in range(4)] == [[32], [32], [8], [8]]
    assert chosen.blocks[0].chosen_by.startswith("net race: 2 candidates, 500 steps")
    run, _ = train_budget(chosen, fake, log=lambda line: None, spent_before=race.block_steps)
    assert read_plan(run.path).spent() == 36_000  # the race's 4,000 came out of the 40,000
    assert Run.open(run.path).config.net_for(0).hidden == [32]
    # a repeated call reads the record; another race in the same place is refused
    again = choose_nets(cfg, fake, log=lambda line: None)
    assert again.choice == race.choice and fake.calls == 2 + len(read_plan(run.path).rounds)
    with pytest.raises(PSMError, match="another race"):
        choose_nets(_cfg(tmp_path, race=0.2), fake, log=lambda line: None)


def test_psm_train_with_candidates_end_to_end_tiny(tmp_path, capsys):
    # x0 prediction near t0 is a trap (its ε error is the x0 error times α/σ: docs/results.md):
    # listed first, the race must still give both blocks the run's own ε-prediction
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data: {name: ty}\npartition: {kind: splits, splits: [0, 0.003, 1], t0: 1.0e-4}\n"
        "net: {name: mlp, hidden: [16]}\n"
        "train: {batch_size: 32, log_every: 20, heldout_points: 64, budget: {total: 800,\n"
        "        race: 0.2, candidates: [{objective: {prediction: x0}}, {}]}}\n"
        "executor: {name: local, workers: 1}\n"
    )
    out = tmp_path / "run"
    argv = ["train", str(cfg), "--out", str(out), "--no-plot", "--no-progress"]
    code, stdout, _ = run_cli(capsys, *argv, "--dry-run")
    assert code == 0 and "# nets: a race of 2 candidates, 40 steps per block" in stdout
    assert not out.exists()
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert (
        "net race: each block keeps the candidate with the lowest held-out term after 40 "
        "steps: 0->1, 1->1" in err
    )
    assert "budget spent: 640 of 640" in err  # 800 less the race's 2 x 2 x 40
    record = json.loads((tmp_path / "run-race" / "race.json").read_text())
    assert record["choice"] == [1, 1] and record["terms"][0][0] > 10 * record["terms"][1][0]
    assert Run.open(out).config.blocks == []
    code, _, err = run_cli(capsys, *argv)  # a repeated call: the same race, nothing to train
    assert code == 0 and "budget spent: 640 of 640" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text().replace("{}]", "{net: {hiddn: [4]}}]"))
    code, _, err = run_cli(capsys, "train", str(bad), "--out", str(tmp_path / "b"))
    assert code == 2 and "candidates[1].net" in err and not (tmp_path / "b").exists()


def _race_yaml(tmp_path, candidates: str) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data: {name: ty}\npartition: {kind: splits, splits: [0, 0.003, 1], t0: 1.0e-4}\n"
        "net: {name: mlp, hidden: [16]}\n"
        "train: {batch_size: 32, log_every: 20, heldout_points: 64, budget: {total: 400,\n"
        f"        race: 0.2, chunk: 0.25, race_by: nll, candidates: {candidates}}}}}\n"
        "executor: {name: local, workers: 1}\n"
    )
    return cfg


@pytest.fixture
def quick_nll_race(monkeypatch):
    """The ODE race's swaps scored on 200 points with 40 RK4 steps (tests)."""
    import psm.auto.nets as nets

    monkeypatch.setattr(nets, "RACE_NLL_POINTS", 200)
    monkeypatch.setattr(nets, "RACE_NLL_STEPS", 40)


def test_a_race_by_the_odes_nll_scores_each_block_swapped_into_candidate_0s_model(
    tmp_path, capsys, quick_nll_race
):
    # x0 prediction near t0 wrecks the ODE (its field is the x0 error times α/σ): swapping the
    # run's own ε-prediction into block 0 of the x0 model must lower the held-out NLL
    cfg = _race_yaml(tmp_path, "[{objective: {prediction: x0}}, {}]")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", str(cfg), "--out", str(out), "--no-plot",
                           "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "held-out ODE NLL with the block swapped in" in err
    record = json.loads((tmp_path / "run-race" / "race.json").read_text())
    assert record["signal"] == "nll" and record["terms"][0] == [0.0, 0.0]
    assert record["terms"][1][0] < -1.0 and record["choice"][0] == 1


def test_a_race_of_two_equal_candidates_by_nll_scores_every_swap_exactly_zero(
    tmp_path, capsys, quick_nll_race
):
    # the same net and seed train the same weights: a swap changes nothing, point by point
    cfg = _race_yaml(tmp_path, "[{}, {net: {hidden: [16]}}]")
    code, _, err = run_cli(capsys, "train", str(cfg), "--out", str(tmp_path / "run"),
                           "--no-plot", "--no-progress")  # fmt: skip
    assert code == 0, err
    record = json.loads((tmp_path / "run-race" / "race.json").read_text())
    assert record["terms"] == [[0.0, 0.0], [0.0, 0.0]] and record["choice"] == [0, 0]
