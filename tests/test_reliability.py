"""Faults a new user meets (issue 10): one line and exit 2 from every executor, a guard on data
contents, a remedy for a non-finite loss that works, per-block step targets, bad configs and
locks, and progress that moves."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import psm.training.train
from helpers import one_line_error, run_cli, tiny_config
from psm.runs.ledger import BlockLedger
from psm.runs.run import Run


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(tiny_config(**sections)))
    return path


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("psm")]


# --------------------------------------------------------------------------- 1. one line, exit 2
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "gpu0", "tpu"])
@pytest.mark.parametrize("extra", [[], ["--workers", "2"], ["--dry-run"]])
def test_a_device_that_is_not_here_is_refused_before_anything_is_written(
    tmp_path, capsys, device, extra
):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = write_config(tmp_path / "c.yaml")
    out = tmp_path / "run"
    one_line_error(
        capsys, "train", cfg, "--out", out, "--set", f"train.device={device}", *extra,
        match="train.device:",
    )  # fmt: skip
    assert not out.exists()


def test_unknown_executor_and_bad_flags_are_one_line(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml")
    one_line_error(capsys, "train", cfg, "--executor", "dask", match="--executor 'dask'")
    code, _, err = run_cli(capsys, "nll", tmp_path / "r", "--steps", "0")
    assert code == 2 and len(error_lines(err)) == 1 and "steps must be >= 1" in err, err
    code, _, err = run_cli(capsys, "train")  # a missing argument
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_failures_in_worker_processes_end_in_one_summary_line(tmp_path, capsys):
    """Every block fails in the spawned workers (non-finite loss): one error line naming the
    blocks, the cause and the remedy; exit 2; psm status holds each block's detail."""
    cfg = write_config(tmp_path / "c.yaml", train={"lr": 1e25, "steps": 30, "log_every": 5})
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", cfg, "--out", out, "--workers", "2", "--no-progress",
                           "--no-plot")  # fmt: skip
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("psm: error: blocks 0-2 failed: non-finite loss"), lines[0]
    assert "--reset-failed" in lines[0] and f"psm status {out}" in lines[0]
    code, status, _ = run_cli(capsys, "status", out)
    assert code == 0 and status.count("non-finite loss") == 3


@pytest.fixture
def immutable(tmp_path):
    """``chattr +i`` on folders: writes there fail even for root (a read-only disk for the
    workers, which no monkeypatch reaches). Skipped where chattr is not available."""
    made: list[Path] = []

    def make(*paths: Path) -> None:
        for p in paths:
            r = subprocess.run(["chattr", "+i", str(p)], capture_output=True)
            if r.returncode != 0:
                pytest.skip(f"chattr +i is not available here: {r.stderr.decode().strip()}")
            made.append(p)

    yield make
    for p in made:
        subprocess.run(["chattr", "-i", str(p)], capture_output=True)


@pytest.mark.parametrize(
    "executor", [["--workers", "2"], ["--workers", "1"], ["--executor", "ensemble"]]
)
def test_a_disk_that_refuses_writes_is_one_line_for_every_executor(
    tmp_path, capsys, immutable, executor
):
    cfg = write_config(tmp_path / "c.yaml", train={"steps": 10})
    out = tmp_path / "run"
    assert run_cli(capsys, "train", cfg, "--out", out, "--no-progress", "--no-plot")[0] == 0
    before = {p: p.read_bytes() for p in (out / "blocks").glob("*.safetensors")}
    immutable(out / "blocks", out / "metrics")
    code, _, err = run_cli(capsys, "train", cfg, "--out", out, "--steps", "20", *executor,
                           "--no-progress", "--no-plot")  # fmt: skip
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("psm: error: "), err
    assert "permission denied" in lines[0] and "Traceback" not in err
    assert {p: p.read_bytes() for p in before} == before  # every checkpoint intact


# --------------------------------------------------------------------------- 2. data guard
def test_a_changed_points_file_is_refused(tmp_path, capsys):
    pts = tmp_path / "P.npy"
    np.save(pts, np.random.default_rng(0).normal(size=(200, 2)))
    cfg = write_config(tmp_path / "c.yaml", data={"name": "points", "path": str(pts)})
    out = tmp_path / "run"
    assert run_cli(capsys, "train", cfg, "--out", out, "--no-progress", "--no-plot")[0] == 0
    rec = json.loads((out / "data.json").read_text())
    assert list(rec["files"]) == [str(pts)] and len(rec["files"][str(pts)]["sha256"]) == 64
    np.save(pts, np.random.default_rng(1).normal(size=(200, 2)))  # other points, same name
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    one_line_error(capsys, "train", cfg, "--out", out, "--steps", "40", "--no-progress",
                   match="changed since run")  # fmt: skip
    one_line_error(capsys, "nll", out, "--n", "10", "--steps", "4", "--no-progress",
                   match="changed since run")  # fmt: skip
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    pts.unlink()
    one_line_error(capsys, "nll", out, "--n", "10", "--no-progress", match="is gone")


# --------------------------------------------------------------------------- 3. NaN remedy
def test_a_lower_learning_rate_after_every_block_failed_with_reset_failed(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", train={"lr": 1e25, "steps": 20})
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", cfg, "--out", out, "--no-progress", "--no-plot")
    assert code == 2 and "--reset-failed" in err
    # the documented remedy: a lower lr. Without the flag the run says how to proceed ...
    one_line_error(capsys, "train", cfg, "--out", out, "--set", "train.lr=1e-3",
                   match="--reset-failed discards its failed blocks")  # fmt: skip
    # ... with it, the failed blocks are discarded (said so) and the run takes the new lr
    code, _, err = run_cli(capsys, "train", cfg, "--out", out, "--set", "train.lr=1e-3",
                           "--reset-failed", "--no-progress", "--no-plot")  # fmt: skip
    assert code == 0, err
    assert "discarded failed block(s) 0-2" in err
    run = Run.open(out)
    assert run.config.train.lr == 1e-3 and all(run.ledger.done(b) for b in range(3))


def test_reset_failed_keeps_blocks_that_hold_training(tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", train={"steps": 20})
    out = tmp_path / "run"
    assert run_cli(capsys, "train", cfg, "--out", out, "--blocks", "0", "--no-progress",
                   "--no-plot")[0] == 0  # fmt: skip
    one_line_error(capsys, "train", cfg, "--out", out, "--set", "train.lr=5e-4",
                   "--reset-failed", match="hold training under its config")  # fmt: skip
    assert Run.open(out).ledger.done(0)


# --------------------------------------------------------------------------- 4. targets
def test_a_subset_with_more_steps_changes_only_its_blocks(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", partition={"kind": "equal", "blocks": 4},
                       train={"steps": 20}, eval={"n_test": 16, "steps": 4})  # fmt: skip
    out = tmp_path / "run"
    assert run_cli(capsys, "train", cfg, "--out", out, "--no-progress", "--no-plot")[0] == 0
    code, _, err = run_cli(capsys, "train", cfg, "--out", out, "--blocks", "1,3", "--steps",
                           "40", "--no-progress", "--no-plot")  # fmt: skip
    assert code == 0, err
    run = Run.open(out)
    got = [(s.state, s.step, s.target) for s in run.ledger.statuses()]
    assert got == [("done", 20, 20), ("done", 40, 40), ("done", 20, 20), ("done", 40, 40)]
    code, out_text, err = run_cli(capsys, "nll", out, "--no-progress")
    assert code == 0 and "NLL" in out_text, err
    code, status, _ = run_cli(capsys, "status", out)
    assert "done 4" in status and "stopped" not in status


# --------------------------------------------------------------------------- 5. bad input
def test_an_empty_config_and_infinite_floats_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing here\n")
    one_line_error(capsys, "train", empty, "--out", tmp_path / "r", match="config file is empty")
    inf = write_config(tmp_path / "inf.yaml", train={"lr": float("inf")})
    one_line_error(capsys, "train", inf, "--out", tmp_path / "r", match="train.lr")
    one_line_error(capsys, "train", write_config(tmp_path / "c.yaml"), "--set", "train.lr=.nan",
                   "--out", tmp_path / "r", match="finite number")  # fmt: skip
    assert not (tmp_path / "r").exists()


def test_a_lock_with_garbage_contents_is_stale_and_taken_over(make_run, capsys):
    run = make_run()
    run.layout.lock(1).write_text("\x00garbage, not a psm lock")
    out = psm.training.train.train_block(run, 1)
    assert out.state == "done"
    assert "not a psm lock" in capsys.readouterr().err
    assert not run.layout.lock(1).exists()


# --------------------------------------------------------------------------- 6. progress
def test_progress_marks_between_log_lines(make_run, monkeypatch):
    """The status step moves between two log lines (at least every PROGRESS_SECONDS)."""
    monkeypatch.setattr(psm.training.train, "PROGRESS_SECONDS", 0.0)
    run = make_run(train={"steps": 30, "log_every": 1000, "checkpoint_every": 1000})
    seen: list[int] = []
    real = BlockLedger.write

    def spy(self, block, **fields):
        if "step" in fields:
            seen.append(fields["step"])
        return real(self, block, **fields)

    monkeypatch.setattr(BlockLedger, "write", spy)
    psm.training.train.train_block(run, 0)
    assert set(range(1, 30)) <= set(seen)


def test_the_nll_bar_moves_at_every_solver_step(monkeypatch):
    from psm.core.likelihood import evaluate_nll
    from psm.core.model import BlockModel
    from psm.core.ode import SolverSettings, solve_units
    from psm.core.partition import splits
    from psm.core.process import make_process

    updates: list[float] = []
    import tqdm.auto

    class Bar(tqdm.auto.tqdm):
        def update(self, n=1):
            updates.append(n)
            return super().update(n)

    monkeypatch.setattr("psm.progress.tqdm", Bar)  # the core reports; the bar is drawn above
    monkeypatch.setenv("PSM_PROGRESS", "bar")  # tqdm even though stderr is no terminal
    from psm.progress import progress_bar

    part = splits([0, 0.5, 1])
    model = BlockModel(make_process("vp"), part, [lambda x, t: 0.1 * x] * 2)
    solver = SolverSettings("rk4", 12)
    with progress_bar("NLL") as bar:
        evaluate_nll(model, torch.randn(10, 2), batch_size=4, solver=solver, progress=bar)
    assert len(updates) == 3 * solve_units(part.segments(), solver) == 36


def test_a_loss_curve_with_one_point_is_drawn_with_markers(make_run, monkeypatch):
    from matplotlib.axes import Axes

    from psm.viz.losses import plot_loss_curves

    run = make_run(train={"steps": 5, "log_every": 5, "checkpoint_every": 5})
    psm.training.train.train_block(run, 0)
    kwargs: list[dict] = []
    real = Axes.plot

    def spy(self, *args, **kw):
        kwargs.append(kw)
        return real(self, *args, **kw)

    monkeypatch.setattr(Axes, "plot", spy)
    plot_loss_curves(run)
    assert kwargs and kwargs[0].get("marker") == "o"


def test_copying_a_run_elsewhere_keeps_its_data_guard_quiet(make_run, tmp_path):
    """Synthetic data have no files: a moved run directory opens and checks clean."""
    run = make_run()
    psm.training.train.train_block(run, 0)
    moved = tmp_path / "moved"
    shutil.copytree(run.path, moved)
    Run.open(moved).check_data()
