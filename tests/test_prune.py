"""Runs that fit on a disk: ``psm train --dry-run`` predicts the files, ``psm prune`` drops the
resume states of done blocks only, ``train.keep_state: false`` does it as blocks finish, and a
pruned block trained further restarts from its final weights with a fresh optimizer."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import one_line_error, run_cli, tiny_config
from psm.runs.config import config_hash, validate_config
from psm.runs.lock import BlockLocks
from psm.runs.prune import format_bytes, predict_disk
from psm.runs.run import Run
from psm.training.stop import StopRequest
from psm.training.train import train_ensemble, train_stack

FAST = {"steps": 20, "batch_size": 32, "log_every": 5, "checkpoint_every": 10,
        "heldout_points": 16}  # fmt: skip
EVAL = {"n_test": 24, "steps": 6, "solver": "rk4", "test_seed": 7}


def raw_config(**train) -> dict:
    return tiny_config(train={**FAST, **train}, eval=EVAL)


def write_config(path: Path, **train) -> Path:
    path.write_text(yaml.safe_dump(raw_config(**train)))
    return path


def open_run(path: Path, **train) -> Run:
    return Run.create(validate_config(raw_config(**train)), path)


class StopAt(StopRequest):
    """Stops a training call after ``n`` steps, as Ctrl-C would."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls > self.n


def interrupt(run: Run, block: int, after: int) -> None:
    assert train_stack(run, [block], StopAt(after))[0].state == "interrupted"


def sizes(run: Run, block: int) -> tuple[int, int, int]:
    logs = run.layout.metrics(block).stat().st_size + run.layout.status(block).stat().st_size
    return (run.layout.weights(block).stat().st_size, run.layout.state(block).stat().st_size,
            logs)  # fmt: skip


# ------------------------------------------------------------------------------ dry run
def test_dry_run_predicts_the_files_of_the_trained_run(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", ema=0.9)
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", cfg, "--out", out_dir, "--dry-run")
    assert code == 0, err
    assert not out_dir.exists()
    line = next(x for x in out.splitlines() if x.startswith("# disk per block"))
    code, _, err = run_cli(capsys, "train", cfg, "--out", out_dir, "--no-progress", "--no-plot")
    assert code == 0, err
    run = Run.open(out_dir)
    predicted = predict_disk(run.config, run.parts, [0, 1, 2])
    for d in predicted:
        weights, state, logs = sizes(run, d.block)
        assert d.weights == pytest.approx(weights, rel=0.03)
        assert d.state == pytest.approx(state, rel=0.03)
        assert d.state > 3.5 * d.weights  # weights, two Adam moments and the EMA
        assert logs / 2 < d.logs < 2 * logs  # rough
    assert f"weights {format_bytes(max(d.weights for d in predicted))}" in line
    assert f"resume state {format_bytes(max(d.state for d in predicted))}" in line
    total = next(x for x in out.splitlines() if x.startswith("# disk for 3 block(s)"))
    assert format_bytes(sum(d.total for d in predicted)) in total
    assert format_bytes(sum(d.pruned for d in predicted)) in total


# ------------------------------------------------------------------------------ psm prune
@pytest.fixture(scope="module")
def mixed_template(tmp_path_factory) -> Path:
    """Blocks 0 and 1 done, block 2 interrupted at step 10 (a resume point, not done)."""
    run = open_run(tmp_path_factory.mktemp("prune") / "run", ema=0.9)
    assert [o.state for o in train_ensemble(run, [0, 1])] == ["done", "done"]
    interrupt(run, 2, 10)
    return run.path


@pytest.fixture
def mixed(mixed_template, tmp_path) -> Run:
    """A fresh copy of :func:`mixed_template` for a test to change."""
    return Run.open(shutil.copytree(mixed_template, tmp_path / "run"))


def test_prune_frees_the_states_of_done_blocks_only(mixed, capsys):
    run = mixed
    state_sizes = {b: run.layout.state(b).stat().st_size for b in range(3)}
    before = {p: p.read_bytes() for p in run.layout.blocks_dir.iterdir()}
    code, out, err = run_cli(capsys, "prune", run.path, "--dry-run")
    assert code == 0, err
    assert f"would free {format_bytes(state_sizes[0] + state_sizes[1])}" in out
    assert {p: p.read_bytes() for p in run.layout.blocks_dir.iterdir()} == before
    code, out, err = run_cli(capsys, "prune", run.path)
    assert code == 0, err
    assert f"freed {format_bytes(state_sizes[0] + state_sizes[1])}" in out
    assert "block(s) 0-1" in out and "kept block(s) 2: not done" in out
    assert "fresh optimizer (new Adam moments; the EMA restarts from those weights)" in out
    assert [run.layout.state(b).exists() for b in range(3)] == [False, False, True]
    assert all(run.layout.weights(b).exists() for b in (0, 1))
    assert run.layout.state(2).read_bytes() == before[run.layout.state(2)]
    assert [s.pruned for s in run.ledger.statuses()] == [True, True, False]
    assert [s.state for s in run.ledger.statuses()] == ["done", "done", "stopped"]
    code, out, _ = run_cli(capsys, "status", run.path, "--json")
    assert code == 0 and out.count('"pruned": true') == 2
    code, out, _ = run_cli(capsys, "status", run.path)
    rows = [x for x in out.splitlines() if x.strip()[:1].isdigit()]
    assert code == 0 and ["pruned" in r for r in rows] == [True, True, False]
    code, out, _ = run_cli(capsys, "prune", run.path)
    assert code == 0 and "nothing to prune" in out and "block(s) 0-1: pruned before" in out


def test_nll_and_sample_read_a_pruned_run_as_before(tmp_path, capsys):
    run = open_run(tmp_path / "run")
    train_ensemble(run)
    args = ["-n", 12, "--steps", 5, "--seed", 3, "--no-progress"]

    def scores() -> tuple[str, np.ndarray]:
        code, out, err = run_cli(capsys, "nll", run.path, "--n", 16, "--no-progress")
        assert code == 0, err
        npz = tmp_path / "s.npz"
        code, _, err = run_cli(capsys, "sample", run.path, *args, "--out", npz, "--force")
        assert code == 0, err
        with np.load(npz) as f:
            return re.search(r"NLL \S+ ± \S+", out).group(0), f["samples"]

    nll, samples = scores()
    assert run_cli(capsys, "prune", run.path)[0] == 0
    assert not any(run.layout.state(b).exists() for b in range(3))
    nll_after, samples_after = scores()
    assert nll_after == nll
    np.testing.assert_array_equal(samples_after, samples)


def test_prune_is_refused_while_a_block_is_being_trained(mixed, capsys):
    run = mixed
    with BlockLocks() as locks:
        assert locks.acquire(run.layout.lock(1))
        before = sorted(p.name for p in run.layout.blocks_dir.iterdir())
        for extra in ([], ["--dry-run"]):
            one_line_error(capsys, "prune", run.path, *extra, match="block(s) 1 are being trained")
        assert sorted(p.name for p in run.layout.blocks_dir.iterdir()) == before
        code, _, err = run_cli(capsys, "prune", run.path, "--blocks", "0,2")
        assert code == 0, err
    assert [run.layout.state(b).exists() for b in range(3)] == [False, True, True]
    assert not run.layout.lock(0).exists()  # prune's own lock is gone


def test_prune_bad_inputs_exit_2(mixed, capsys, tmp_path):
    one_line_error(capsys, "prune", tmp_path / "nowhere", match="does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, "prune", tmp_path / "empty", match="not a psm run directory")
    one_line_error(capsys, "prune", mixed.path, "--blocks", "7", match="out of range")
    one_line_error(capsys, "prune", mixed.path, "--blocks", "x", match="--blocks")
    assert all(mixed.layout.state(b).exists() for b in range(3))


# ------------------------------------------------------------------------------ extending
def test_a_pruned_block_trained_further_restarts_from_its_final_weights(tmp_path, capsys):
    run = open_run(tmp_path / "run", ema=0.9)
    assert [o.state for o in train_ensemble(run, [0, 1])] == ["done", "done"]
    final0 = load_file(run.layout.weights(0))
    assert run_cli(capsys, "prune", run.path, "--blocks", "0")[0] == 0
    longer = open_run(run.path, ema=0.9, steps=30)  # more steps: same problem, same hash
    interrupt(longer, 0, 0)  # restart, then stop before the first step: its resume point
    err = capsys.readouterr().err
    assert "block 0 has no resume point (pruned): it continues from its final weights at " in err
    assert "step 20 with a fresh optimizer (new Adam moments; the EMA restarts" in err
    state = load_file(longer.layout.state(0))
    assert not any(k.startswith("adam_") for k in state)  # a fresh Adam
    for k, v in final0.items():  # the net and its EMA start from the final (EMA) weights
        assert torch.equal(state[f"net.{k}"], v) and torch.equal(state[f"ema.{k}"], v)
    rec = longer.ledger.read(0)
    assert rec["optimizer_restarts"] == [20] and rec["step"] == 20
    assert not longer.ledger.status(0).pruned
    # block 0 (fresh optimizer) and block 1 (its own Adam) at the same step: both go on
    outs = train_ensemble(longer, [0, 1])
    assert [(o.state, o.step) for o in outs] == [("done", 30), ("done", 30)]
    assert longer.ledger.read(1).get("optimizer_restarts") is None
    straight = open_run(tmp_path / "straight", ema=0.9, steps=30)
    train_ensemble(straight, [0, 1])  # straight to 30 steps

    def gap(b: int) -> float:
        a, s = load_file(longer.layout.weights(b)), load_file(straight.layout.weights(b))
        return max(float((a[k] - s[k]).abs().max()) for k in a)

    assert gap(1) < 1e-5  # block 1 resumed its own Adam and EMA (stacked: float rounding)
    assert gap(0) > 1e-3  # block 0 restarted them


# ------------------------------------------------------------------------------ keep_state
def test_keep_state_false_keeps_only_final_weights_and_not_the_hash(tmp_path, capsys):
    kept = validate_config(raw_config())
    dropped = validate_config(raw_config(keep_state=False))
    assert config_hash(kept) == config_hash(dropped)
    cfg = write_config(tmp_path / "c.yaml")
    out_dir = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "train", cfg, "--out", out_dir, "--prune-done", "--no-progress", "--no-plot"
    )
    assert code == 0, err
    run = Run.open(out_dir)
    assert run.hash == config_hash(kept) and run.config.train.keep_state is False
    assert [run.layout.state(b).exists() for b in range(3)] == [False] * 3
    assert all(run.ledger.done(b) and run.ledger.status(b).pruned for b in range(3))
    assert not list(run.layout.blocks_dir.glob(".*.tmp"))
    code, out, err = run_cli(capsys, "train", cfg, "--out", out_dir, "--dry-run", "--prune-done")
    assert code == 0 and "as each block finishes" in out
    one_line_error(
        capsys, "train", cfg, "--out", tmp_path / "b", "--budget", "60", "--prune-done",
        match="train.keep_state: false does not go with train.budget",
    )  # fmt: skip
