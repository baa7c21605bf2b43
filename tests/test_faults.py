"""Faults a long training run meets, each through the real train_block / train_ensemble code:
a killed worker, two workers on one block, a dead lock holder, a non-finite loss, a full or
read-only disk, and a run extended to more steps."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

import psm.runs.atomic
import psm.runs.lock
import psm.training.train
from helpers import tiny_config
from psm.cli import main
from psm.errors import RunError
from psm.executors.ray import train_task
from psm.runs.checkpoint import load_state, load_weights
from psm.runs.lock import BlockLocks
from psm.runs.run import Run
from psm.training.train import BlockProblem, train_block, train_ensemble


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(tiny_config(**sections)))
    return path


def slow_draws(monkeypatch, seconds: float = 0.002) -> None:
    """Make every training step at least ``seconds`` long (so a test can act mid-block)."""
    draw = BlockProblem.draw_batch

    def slow(self, generator):
        time.sleep(seconds)
        return draw(self, generator)

    monkeypatch.setattr(BlockProblem, "draw_batch", slow)


def spy_resume_steps(monkeypatch) -> dict[int, list[int]]:
    """Record, per block, the step each load of its resume point returned (0: none)."""
    seen: dict[int, list[int]] = {}
    real = psm.training.train.load_state

    def spy(run, block, net):
        st = real(run, block, net)
        seen.setdefault(block, []).append(st.step if st else 0)
        return st

    monkeypatch.setattr(psm.training.train, "load_state", spy)
    return seen


def temp_files(run: Run) -> list[Path]:
    return [p for p in run.path.rglob("*") if p.name.endswith(".tmp") or ".stale-" in p.name]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_lock(path: Path, *, host: str, pid: int, age: float) -> None:
    info = {"host": host, "pid": pid, "token": "old", "heartbeat": time.time() - age}
    path.write_text(json.dumps(info))


# --------------------------------------------------------------------------- killed worker
SLOW_STEPS = """
import time
import psm.training.train as tr
draw = tr.BlockProblem.draw_batch
def slow(self, g):
    time.sleep(0.01)
    return draw(self, g)
tr.BlockProblem.draw_batch = slow
"""


@pytest.mark.slow
def test_sigkill_of_a_worker_mid_block_then_same_command_resumes(tmp_path, capsys):
    """`psm train --workers 2`; one worker is killed with SIGKILL in the middle of its block:
    the other block finishes, the killed one is reported failed, and the same command again
    resumes it from its last checkpoint to usable final weights."""
    cfg = write_config(
        tmp_path / "c.yaml", partition={"kind": "equal", "blocks": 2},
        train={"steps": 300, "checkpoint_every": 50, "log_every": 10, "threads": 1},
    )  # fmt: skip
    out_dir = tmp_path / "run"
    argv = ["train", str(cfg), "--out", str(out_dir), "--executor", "local", "--workers", "2",
            "--no-progress", "--no-plot"]  # fmt: skip
    hook = tmp_path / "hook"  # slows every step of the spawned workers down to >= 10 ms
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_STEPS)
    env = {**os.environ, "PYTHONPATH": str(hook)}
    proc = subprocess.Popen([sys.executable, "-m", "psm.cli", *argv], env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    killed: dict = {}
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not killed:
            if (out_dir / "config.yaml").exists():
                rec = Run.open(out_dir).ledger.read(0) or {}
                if rec.get("state") == "running" and (rec.get("checkpoint_step") or 0) >= 50:
                    os.kill(rec["pid"], signal.SIGKILL)
                    killed = rec
            time.sleep(0.02)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert killed and killed["step"] < 300, "block 0 finished before its worker was killed"
    assert proc.returncode == 2, err  # a block the user must rerun: exit 2, one summary line
    assert err.strip().splitlines()[-1].startswith("psm: error: block 0 failed: worker died")
    run = Run.open(out_dir)
    st = run.ledger.status(0)
    assert (st.state, st.error) == ("failed", "worker died (exit code -9)")
    assert 50 <= st.checkpoint_step < 300 and run.layout.lock(0).exists()
    assert run.ledger.status(1).state == "done"
    # the same command again: takes the dead worker's lock, resumes from its checkpoint
    assert main(argv) == 0, capsys.readouterr().err
    rec = run.ledger.read(0)
    assert rec["state"] == "done" and rec["start_step"] == st.checkpoint_step
    assert not run.layout.lock(0).exists() and not temp_files(run)
    net = BlockProblem.build(run, 0).new_net()
    assert load_weights(run, 0, net) == 300
    assert torch.isfinite(net(torch.randn(8, 2), torch.full((8,), 0.25))).all()
    steps = [json.loads(line)["step"] for line in run.layout.metrics(0).read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 300


# --------------------------------------------------------------------------- locks
def test_two_workers_on_one_block_one_trains_the_other_skips(make_run, monkeypatch):
    run = make_run(train={"steps": 200, "log_every": 10, "checkpoint_every": 100})
    slow_draws(monkeypatch)
    first: list = []
    worker = threading.Thread(target=lambda: first.append(train_block(run, 0)))
    worker.start()
    try:
        deadline = time.time() + 30
        while not (run.layout.lock(0).exists() and run.ledger.read(0)) and time.time() < deadline:
            time.sleep(0.01)
        second = train_block(run, 0)
        assert second.state == "locked"
        assert second.error == f"held by {socket.gethostname()}:{os.getpid()}"
        stacked = train_ensemble(run, [0, 1])  # the ensemble trainer respects the lock too
        assert [o.state for o in stacked] == ["locked", "done"]
    finally:
        worker.join(timeout=60)
    assert first[0].state == "done" and first[0].step == 200
    assert train_block(run, 0).state == "skipped"


@pytest.mark.parametrize(
    "host, age, trains",
    [
        ("here", 0.0, True),  # same host, pid gone: taken over at once
        ("elsewhere", 500.0, True),  # another host, heartbeat long stale
        ("elsewhere", 0.0, False),  # another host, fresh heartbeat: a live holder
    ],
)
def test_lock_of_a_dead_holder_does_not_block(make_run, host, age, trains):
    run = make_run()
    name = socket.gethostname() if host == "here" else "elsewhere-node"
    write_lock(run.layout.lock(1), host=name, pid=dead_pid(), age=age)
    out = train_block(run, 1)
    assert out.state == ("done" if trains else "locked")
    assert not list(run.path.glob("blocks/*.stale-*"))


def test_cluster_task_waits_for_a_lock_going_stale_on_another_host(make_run):
    """A retried task that lands on another machine than its killed attempt waits for the
    dead holder's heartbeat to go stale, then resumes the block."""
    run = make_run()
    write_lock(run.layout.lock(2), host="elsewhere-node", pid=1, age=119.0)  # stale in 1 s
    t = time.monotonic()
    (out,) = train_task(str(run.path), [2], lock_wait_s=20, poll_s=0.2)
    assert out.state == "done" and 0.5 < time.monotonic() - t < 20
    # a live holder on this host is not waited for
    run2 = make_run()
    with BlockLocks() as locks:
        assert locks.acquire(run2.layout.lock(0))
        t = time.monotonic()
        (out,) = train_task(str(run2.path), [0], lock_wait_s=20, poll_s=0.2)
        assert out.state == "locked" and time.monotonic() - t < 5


def test_two_takers_of_one_stale_lock_do_not_both_win(tmp_path, monkeypatch):
    path = tmp_path / "0000.lock"
    write_lock(path, host=socket.gethostname(), pid=dead_pid(), age=0.0)
    a, b = BlockLocks(), BlockLocks()
    real = psm.runs.lock._is_stale
    raced = []

    def judge(p, info, stale_after):
        verdict = real(p, info, stale_after)
        if verdict and not raced:  # B judged the lock stale; A slips in before B removes it
            raced.append(True)
            assert a.acquire(path)
        return verdict

    monkeypatch.setattr(psm.runs.lock, "_is_stale", judge)
    try:
        mine = None
        assert b.acquire(path) is False  # B must not remove A's fresh lock and take the block
        mine = json.loads(path.read_text())["token"]
        assert a.holds(path) and mine == a._held[path]
        assert not list(tmp_path.glob("*.stale-*"))
    finally:
        a.release_all()
        b.release_all()
    assert raced and mine is not None and not path.exists()


# --------------------------------------------------------------------------- non-finite loss
def poison_block(monkeypatch, block: int, after: int, value: float) -> None:
    """From its ``after+1``-th step on, ``block`` gets ``value`` in its targets."""
    draws: dict[int, int] = {}
    draw = BlockProblem.draw_batch

    def poisoned(self, generator):
        batch = draw(self, generator)
        draws[self.block] = draws.get(self.block, 0) + 1
        if self.block == block and draws[block] > after:
            batch = dataclasses.replace(batch, target=torch.full_like(batch.target, value))
        return batch

    monkeypatch.setattr(BlockProblem, "draw_batch", poisoned)


@pytest.mark.parametrize("trainer", ["block", "ensemble"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_the_block_and_keeps_its_checkpoint(
    make_run, monkeypatch, capsys, trainer, value
):
    run = make_run(train={"steps": 60, "log_every": 5, "checkpoint_every": 20})
    poison_block(monkeypatch, block=1, after=35, value=value)
    outs = train_ensemble(run) if trainer == "ensemble" else [train_block(run, b) for b in range(3)]
    assert [o.state for o in outs] == ["done", "failed", "done"]
    err = outs[1].error
    assert err.startswith("block 1: non-finite loss") and err.endswith("at step 36"), err
    assert ("nan" if value != value else "inf") in err
    # the last good checkpoint (step 20) stays and loads; no final weights were written
    state = load_state(run, 1, BlockProblem.build(run, 1).new_net())
    assert state is not None and state.step == 20
    assert all(torch.isfinite(v).all() for v in state.net.values())
    assert not run.layout.weights(1).exists()
    st = run.ledger.status(1)
    assert st.state == "failed" and st.error == err and st.checkpoint_step == 20
    assert main(["status", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert " failed " in out and err in out


# --------------------------------------------------------------------------- disk faults
def fail_second_checkpoint(monkeypatch, err: int) -> None:
    """The disk 'fills up' (or turns read-only) when a block's second checkpoint is written."""
    real = os.fsync
    count = {"n": 0}

    def fsync(fd):
        if ".state.safetensors." in os.readlink(f"/proc/self/fd/{fd}"):
            count["n"] += 1
            if count["n"] >= 2:
                raise OSError(err, os.strerror(err))
        return real(fd)

    monkeypatch.setattr(psm.runs.atomic.os, "fsync", fsync)


@pytest.mark.parametrize(
    "err, reason", [(errno.ENOSPC, "no space left on device"), (errno.EACCES, "permission denied")]
)
def test_full_or_read_only_disk_is_a_clear_error_and_tears_nothing(
    tmp_path, monkeypatch, capsys, err, reason
):
    cfg = write_config(
        tmp_path / "c.yaml", partition={"kind": "equal", "blocks": 1},
        train={"steps": 40, "log_every": 5, "checkpoint_every": 10},
    )  # fmt: skip
    out_dir = tmp_path / "run"
    fail_second_checkpoint(monkeypatch, err)
    code = main(["train", str(cfg), "--out", str(out_dir), "--no-progress", "--no-plot"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("psm: error")]
    assert code == 2 and len(lines) == 1
    assert lines[0].endswith(f"0000.state.safetensors: {reason}"), lines[0]
    run = Run.open(out_dir)
    assert not temp_files(run)
    state = load_state(run, 0, BlockProblem.build(run, 0).new_net())  # the old one, intact
    assert state is not None and state.step == 10
    st = run.ledger.status(0)
    assert st.state == "failed" and reason in st.error
    # with the disk fixed, the same command resumes from that checkpoint
    monkeypatch.undo()
    seen = spy_resume_steps(monkeypatch)
    assert main(["train", str(cfg), "--out", str(out_dir), "--no-progress", "--no-plot"]) == 0
    assert seen[0] == [10] and run.ledger.status(0).state == "done"


def test_failed_append_leaves_no_torn_line(tmp_path, monkeypatch):
    log = tmp_path / "m.jsonl"
    psm.runs.atomic.append_line(log, '{"step": 1}')
    real = os.write

    def half_then_full(fd, data):
        real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(psm.runs.atomic.os, "write", half_then_full)
    with pytest.raises(RunError, match=r"m\.jsonl: no space left on device"):
        psm.runs.atomic.append_line(log, '{"step": 2, "loss": 0.5}')
    monkeypatch.undo()
    assert log.read_text() == '{"step": 1}\n'


# --------------------------------------------------------------------------- extended run
@pytest.mark.parametrize("executor", ["local", "ensemble"])
def test_more_steps_on_the_same_run_continue_every_block(tmp_path, monkeypatch, capsys, executor):
    cfg = write_config(tmp_path / "c.yaml", train={"steps": 30, "checkpoint_every": 10})
    out_dir = tmp_path / "run"
    argv = ["train", str(cfg), "--out", str(out_dir), "--executor", executor,
            "--no-progress", "--no-plot"]  # fmt: skip
    assert main(argv) == 0
    seen = spy_resume_steps(monkeypatch)  # one training loop: both executors resume through it
    assert main([*argv, "--steps", "50"]) == 0, capsys.readouterr().err
    assert {b: s[-1] for b, s in seen.items()} == {0: 30, 1: 30, 2: 30}
    run = Run.open(out_dir)
    for b in range(3):
        st = run.ledger.status(b)
        assert (st.state, st.step, st.target) == ("done", 50, 50)
        steps = [
            json.loads(line)["step"] for line in run.layout.metrics(b).read_text().splitlines()
        ]
        assert steps == sorted(set(steps)) and steps[-1] == 50
