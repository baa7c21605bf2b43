"""Optional Weights & Biases logging (``train.wandb``), with a fake ``wandb`` module: one W&B
run per block, its id kept in the run directory, a resumed block continuing its own W&B run
without dropping or repeating steps, and a one-line error when wandb is missing."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import run_cli, tiny_config
from psm.errors import PSMError
from psm.runs.config import RunConfig, config_hash, validate_config
from psm.runs.run import Run
from psm.runs.wandb_log import WandbBlocks, read_record, record_path
from psm.training.train import train_ensemble

TRAIN = {"steps": 20, "log_every": 5, "checkpoint_every": 10, "heldout_every": 10,
         "heldout_points": 64}  # fmt: skip


class FakeRun:
    """What ``wandb.init`` returns: records what it is sent."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.finished = False

    def log(self, data: dict[str, float], step: int | None = None) -> None:
        assert not self.finished and step is not None
        self.logged.append((step, dict(data)))

    def finish(self) -> None:
        self.finished = True

    @property
    def block(self) -> int:
        return self.kwargs["config"]["block"]

    def steps(self, key: str = "loss") -> list[int]:
        return [s for s, d in self.logged if key in d]


@pytest.fixture
def fake_wandb(monkeypatch) -> types.ModuleType:
    mod = types.ModuleType("wandb")
    mod.runs = []

    def init(**kwargs: Any) -> FakeRun:
        run = FakeRun(kwargs)
        mod.runs.append(run)
        return run

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def config(steps: int = 20, **wandb: Any) -> RunConfig:
    raw = tiny_config(
        partition={"kind": "equal", "blocks": 2},
        train={**TRAIN, "steps": steps, "wandb": {"project": "psm-test", **wandb}},
    )
    return validate_config(raw)


def test_train_wandb_is_not_hashed_and_takes_a_project_name():
    plain = validate_config(tiny_config())
    named = validate_config(tiny_config(train={"wandb": "psm-test"}))
    assert named.train.wandb is not None and named.train.wandb.project == "psm-test"
    assert config_hash(named) == config_hash(plain)
    with pytest.raises(PSMError, match=r"train\.wandb"):
        validate_config(tiny_config(train={"wandb": {"project": "p", "colour": "red"}}))


def test_each_block_logs_to_its_own_run_and_a_resumed_block_continues_it(tmp_path, fake_wandb):
    run = Run.create(config(20, entity="team", tags=["toy"]), tmp_path / "run")
    outs = train_ensemble(run)
    assert [o.state for o in outs] == ["done", "done"]
    first = {r.block: r for r in fake_wandb.runs}
    assert sorted(first) == [0, 1] and all(r.finished for r in first.values())
    ids = {}
    for b, r in first.items():
        rec = read_record(run.path, b)
        assert rec is not None and record_path(run.path, b) == run.path / "wandb" / (
            f"block_{b:04d}.json"
        )
        kw = r.kwargs
        assert kw["id"] == rec["id"] and kw["resume"] == "allow"
        assert (kw["project"], kw["entity"], kw["tags"]) == ("psm-test", "team", ["toy"])
        assert kw["group"] == f"tiny-{run.hash}" and kw["reinit"] == "create_new"
        assert kw["config"]["config_hash"] == run.hash
        assert Path(kw["dir"]) == run.path.resolve()
        assert r.steps("loss") == [5, 10, 15, 20] and r.steps("heldout") == [10, 20]
        assert rec["last_step"] == 20
        ids[b] = rec["id"]
    assert ids[0] != ids[1]
    # the same loss as the metrics file, at the same step
    metrics = [json.loads(x) for x in run.layout.metrics(0).read_text().splitlines()]
    sent = dict((s, d["loss"]) for s, d in first[0].logged if "loss" in d)
    assert all(sent[m["step"]] == pytest.approx(m["loss"]) for m in metrics if "loss" in m)

    # block 1's earlier attempt had sent steps 25 and 30 before it died (its record says so);
    # extending both blocks to 40 steps continues each block's W&B run from step 20
    rec1 = read_record(run.path, 1)
    record_path(run.path, 1).write_text(json.dumps({**rec1, "last_step": 30}))
    fake_wandb.runs.clear()
    run = Run.create(config(40, entity="team", tags=["toy"]), tmp_path / "run")
    train_ensemble(run)
    again = {r.block: r for r in fake_wandb.runs}
    assert {b: r.kwargs["id"] for b, r in again.items()} == ids  # the same W&B runs
    assert all(r.kwargs["resume"] == "allow" and r.finished for r in again.values())
    assert again[0].steps() == [25, 30, 35, 40]  # every new step, none twice
    assert again[1].steps() == [35, 40]  # 25 and 30 are in W&B already
    assert read_record(run.path, 0)["last_step"] == 40


def test_a_block_that_starts_over_gets_a_new_wandb_run(tmp_path, fake_wandb):
    run = Run.create(config(), tmp_path / "run")
    path = record_path(run.path, 0)
    path.parent.mkdir(parents=True)
    old = {"id": "oldid123", "project": "psm-test", "entity": None, "block": 0, "last_step": 15}
    path.write_text(json.dumps(old))
    # resumed from step 10 (its checkpoint): the same W&B run; step 15 was sent already
    sink = WandbBlocks(run, [0], {0: 10})
    sink.log(0, {"loss": 1.0}, 15)
    sink.log(0, {"loss": 0.9}, 20)
    sink.log(0, {"heldout": 0.5}, 20)  # a second value at the step just sent
    sink.close()
    (resumed,) = fake_wandb.runs
    assert resumed.kwargs["id"] == "oldid123" and resumed.finished
    assert resumed.logged == [(20, {"loss": 0.9}), (20, {"heldout": 0.5})]
    # from step 0 (--reset-failed discarded its checkpoint): a new W&B run, the old id kept
    sink = WandbBlocks(run, [0], {0: 0})
    sink.log(0, {"loss": 2.0}, 5)
    sink.close()
    fresh = fake_wandb.runs[-1]
    rec = read_record(run.path, 0)
    assert fresh.kwargs["id"] == rec["id"] != "oldid123" and rec["replaced"] == ["oldid123"]
    assert fresh.logged == [(5, {"loss": 2.0})]


def test_a_stack_split_shares_the_blocks_open_runs(tmp_path, fake_wandb):
    run = Run.create(config(), tmp_path / "run")
    outer = WandbBlocks(run, [0, 1], {0: 0, 1: 0})
    inner = WandbBlocks(run, [1], {1: 10})  # the healthy block of a split stack
    assert len(fake_wandb.runs) == 2
    inner.log(1, {"loss": 1.0}, 15)
    inner.close()
    assert not any(r.finished for r in fake_wandb.runs)
    outer.close()
    assert all(r.finished for r in fake_wandb.runs)


def test_train_wandb_without_wandb_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config()))
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", cfg, "--out", out, "--set", "train.wandb=psm",
                           "--no-progress", "--no-plot")  # fmt: skip
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0] == (
        "psm: error: train.wandb is set but wandb is not installed: pip install 'psm[wandb]', "
        "or drop train.wandb"
    )
    assert not out.exists()
    # the Python API refuses before any block is touched
    run = Run.create(config(), tmp_path / "api")
    with pytest.raises(PSMError, match="wandb is not installed"):
        train_ensemble(run)
    assert run.ledger.read(0) is None and not run.layout.state(0).exists()
