"""The psm command line: training, status, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import one_line_error, run_cli, tiny_config
from psm.cli import main
from psm.runs.run import Run


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(tiny_config(**sections)))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_train_then_status(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml")
    out_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", cfg, "--out", out_dir, "--no-progress")
    assert code == 0, err
    assert "3/3 block(s) done" in err
    assert (out_dir / "loss_curves.png").stat().st_size > 1000
    code, out, _ = run_cli(capsys, "status", out_dir)
    assert code == 0
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3 and all(" done " in r and "20/20" in r for r in rows)
    # a second call trains nothing and changes nothing
    before = snapshot(out_dir / "blocks")
    code, _, err = run_cli(capsys, "train", cfg, "--out", out_dir, "--no-progress")
    assert code == 0 and "0 to train" in err
    assert snapshot(out_dir / "blocks") == before


def test_blocks_subset_steps_seed_and_set(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml")
    out_dir = tmp_path / "r"
    code, _, err = run_cli(
        capsys, "train", cfg, "--out", out_dir, "--blocks", "0,2", "--steps", "10",
        "--seed", "4", "--set", "train.lr=0.002", "--executor", "ensemble", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    run = Run.open(out_dir)
    assert run.config.train.steps == 10 and run.config.train.seed == 4
    assert run.config.train.lr == 0.002
    assert [run.ledger.done(b) for b in range(3)] == [True, False, True]


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", partition={"kind": "splits", "splits": [0, 0.1, 1]})
    code, out, _ = run_cli(capsys, "train", cfg, "--out", tmp_path / "r", "--dry-run")
    assert code == 0
    assert "config_hash:" in out and "U[0.0001, 0.1]" in out and "U[0.1, 1]" in out
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "sections, match",
    [
        ({"data": {"name": "swirl"}}, "data.name: unknown dataset 'swirl'"),
        ({"net": {"name": "resnet"}}, "net.name: unknown net 'resnet'"),
        ({"process": {"name": "ve"}}, "process.name: unknown process 've' (choose from ot, vp)"),
        ({"train": {"batch_size": "big"}}, "train.batch_size: Input should be a valid integer"),
        ({"partition": {"kind": "splits", "splits": [0, 0.5, 0.3, 1]}}, "strictly increasing"),
        ({"partition": {"kind": "splits", "splits": [-0.1, 0.5, 1]}}, "must lie in [0, 1]"),
        ({"partition": {"kind": "equal", "blocks": 0}}, "number of blocks must be >= 1"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, sections, match):
    cfg = write_config(tmp_path / "c.yaml", **sections)
    one_line_error(capsys, "train", cfg, "--out", tmp_path / "r", match=match)
    assert not (tmp_path / "r").exists()


def test_malformed_yaml(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {steps: 10\n")
    one_line_error(capsys, "train", cfg, match="malformed YAML at line")


def test_missing_run_directory(tmp_path, capsys):
    one_line_error(capsys, "status", tmp_path / "nope", match="does not exist")


def test_other_config_in_run_directory_is_refused(tmp_path, capsys):
    out_dir = tmp_path / "r"
    assert main(["train", str(write_config(tmp_path / "a.yaml")), "--out", str(out_dir),
                 "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    before = snapshot(out_dir)
    other = write_config(tmp_path / "b.yaml", train={"lr": 0.01})
    one_line_error(capsys, "train", other, "--out", out_dir, match="differs in train.lr")
    assert snapshot(out_dir) == before


def test_foreign_block_checkpoint_exit_2(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    cfg_a = write_config(tmp_path / "a.yaml", train={"steps": 10})
    cfg_b = write_config(tmp_path / "b.yaml", train={"steps": 10, "lr": 0.01})
    assert main(["train", str(cfg_a), "--out", str(a), "--blocks", "1", "--no-progress"]) == 0
    assert main(["train", str(cfg_b), "--out", str(b), "--blocks", "0", "--no-progress"]) == 0
    capsys.readouterr()
    shutil.copy(Run.open(a).layout.state(1), Run.open(b).layout.state(1))
    before = snapshot(b)
    msg = "block 1: blocks/0001.state.safetensors was written under another config"
    msg = "block 1: blocks/0001.state.safetensors was written under another config"
    one_line_error(capsys, "train", cfg_b, "--out", b, "--blocks", "1", match=msg)
    assert snapshot(b) == before


def test_truncated_block_checkpoint_exit_2(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", train={"steps": 10, "checkpoint_every": 5})
    out_dir = tmp_path / "r"
    assert main(["train", str(cfg), "--out", str(out_dir), "--blocks", "2", "--no-progress"]) == 0
    capsys.readouterr()
    run = Run.open(out_dir)
    data = run.layout.state(2).read_bytes()
    run.layout.state(2).write_bytes(data[:100])
    run.ledger.write(2, state="stopped")
    before = snapshot(out_dir)
    one_line_error(capsys, "train", cfg, "--out", out_dir, "--steps", "20", "--blocks", "2",
                   match="unreadable (truncated or corrupt")  # fmt: skip
    # only the config's step target may change; the damaged checkpoint is left for the user
    assert (
        snapshot(out_dir)["blocks/0002.state.safetensors"]
        == before["blocks/0002.state.safetensors"]
    )


def test_bad_blocks_flag(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml")
    one_line_error(capsys, "train", cfg, "--blocks", "1-x", match="--blocks '1-x'")
    one_line_error(capsys, "train", cfg, "--blocks", "7", match="out of range 0-2")


@pytest.mark.slow
def test_ctrl_c_then_same_command_resumes(tmp_path):
    """Issue 2 'done means': Ctrl-C during `psm train --executor local --workers 2`, then the
    same command resumes from the saved steps instead of restarting."""
    cfg = write_config(
        tmp_path / "c.yaml", partition={"kind": "equal", "blocks": 2},
        train={"steps": 100000, "checkpoint_every": 100000, "log_every": 50},
    )  # fmt: skip
    out_dir = tmp_path / "r"
    cmd = [sys.executable, "-m", "psm.cli", "train", str(cfg), "--out", str(out_dir),
           "--executor", "local", "--workers", "2", "--no-progress", "--no-plot"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    run = None
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until both blocks have made progress
        time.sleep(0.5)
        if (out_dir / "config.yaml").exists():
            run = Run.open(out_dir)
            if all(run.ledger.status(b).step >= 100 for b in range(2)):
                break
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    assert run is not None
    stopped = [run.ledger.status(b) for b in range(2)]
    assert all(s.state == "stopped" and s.checkpoint_step == s.step >= 100 for s in stopped)
    # the same command with a reachable target continues from the checkpoints
    resume_at = [s.step for s in stopped]
    target = max(resume_at) + 40
    cmd[cmd.index("train") + 1 : cmd.index("train") + 1] = []
    done = subprocess.run([*cmd, "--steps", str(target)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for b in range(2):
        steps = [int(line.split('"step": ')[1].split(",")[0])
                 for line in run.layout.metrics(b).read_text().splitlines()]  # fmt: skip
        assert steps == sorted(set(steps)) and steps[-1] == target
        assert Run.open(out_dir).ledger.status(b).state == "done"
        # wall time kept accumulating from the interrupted part instead of restarting
        assert Run.open(out_dir).ledger.status(b).wall_time > stopped[b].wall_time


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    # `psm reproduce --plan | head -1`: stdout's reader has gone before psm writes
    read_end, write_end = os.pipe()
    os.close(read_end)
    cmd = [sys.executable, "-m", "psm.cli", "reproduce", "--preset", "tiny", "--plan", "--out",
           str(tmp_path / "r")]  # fmt: skip
    try:
        proc = subprocess.run(cmd, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""
