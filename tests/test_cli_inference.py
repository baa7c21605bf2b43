"""psm nll / sample / plot on tiny trained runs: results, files written, one-line refusals."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from helpers import one_line_error, run_cli, tiny_config
from psm.runs.config import validate_config
from psm.runs.inference import evaluate_run
from psm.runs.run import Run
from psm.training.train import train_block

# the eval section is what `psm nll` falls back on: small, so the defaults run fast
EVAL = {"n_test": 48, "steps": 12, "solver": "rk4", "test_seed": 7}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Run:
    """A tiny TY run (3 blocks x 20 steps), every block done."""
    run = Run.create(
        validate_config(tiny_config(eval=EVAL)), tmp_path_factory.mktemp("inference") / "run"
    )
    for b in range(run.num_blocks):
        assert train_block(run, b).state == "done"
    return run


@pytest.fixture
def unfinished(make_run) -> Run:
    run = make_run()
    assert train_block(run, 0).state == "done"
    return run


def log_lines(run: Run) -> list[dict]:
    path = run.path / "nll.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# --------------------------------------------------------------------------- nll
def test_nll_prints_nll_stderr_and_floor_and_appends_a_record(trained, capsys, tmp_path):
    before = len(log_lines(trained))
    code, out, err = run_cli(
        capsys, "nll", trained.path, "--no-progress", "--json", tmp_path / "r.json"
    )
    assert code == 0, err
    m = re.search(r"NLL (\S+) ± (\S+) nats.*true entropy, the floor: (\S+) nats", out)
    assert m, out
    nll, se, floor = (float(v) for v in m.groups())
    assert math.isfinite(nll) and 0 < se < 1
    assert floor == pytest.approx(trained.dataset.entropy, abs=1e-4)
    recs = log_lines(trained)
    assert len(recs) == before + 1
    rec = recs[-1]
    # defaults from the run's eval section, every setting recorded
    assert (rec["n"], rec["steps"], rec["solver"], rec["test_seed"]) == (48, 12, "rk4", 7)
    assert rec["trace"] == "exact" and rec["rtol"] is None and rec["finite"] is True
    assert rec["config_hash"] == trained.hash and rec["blocks"] == 3 and rec["dataset"] == "ty"
    assert rec["gap"] == pytest.approx(rec["nll"] - rec["entropy"])
    assert rec["nll"] == pytest.approx(nll, abs=1e-4) and rec["stderr"] == pytest.approx(
        se, abs=1e-4
    )
    assert json.loads((tmp_path / "r.json").read_text()) == rec
    # the same number as the library call with the same settings
    ev = evaluate_run(trained, progress=False)
    assert rec["nll"] == pytest.approx(ev.result.nll, abs=1e-9)


def test_nll_flags_override_the_defaults(trained, capsys):
    code, out, err = run_cli(
        capsys, "nll", trained.path, "--n", 20, "--solver", "dopri5", "--rtol", 1e-3,
        "--atol", 1e-3, "--trace", "hutchinson", "--seed", 3, "--probe-seed", 5,
        "--batch-size", 8, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "dopri5 rtol 0.001" in out and "hutchinson trace" in out
    rec = log_lines(trained)[-1]
    assert (rec["n"], rec["solver"], rec["steps"], rec["rtol"], rec["atol"]) == (
        20, "dopri5", None, 1e-3, 1e-3,
    )  # fmt: skip
    assert (rec["trace"], rec["test_seed"], rec["probe_seed"], rec["batch_size"]) == (
        "hutchinson", 3, 5, 8,
    )  # fmt: skip
    code, _, err = run_cli(
        capsys, "nll", trained.path, "--n", 9, "--steps", "3,4,5", "--no-progress"
    )
    assert code == 0, err
    assert log_lines(trained)[-1]["steps"] == [3, 4, 5]


def test_nll_refuses_bad_flags_and_writes_nothing(trained, capsys, tmp_path):
    before = log_lines(trained)
    one_line_error(
        capsys, "nll", trained.path, "--rtol", 1e-3, match="--rtol applies to adaptive solvers only"
    )
    one_line_error(capsys, "nll", trained.path, "--steps", "5,5", match="2 per-block values")
    one_line_error(capsys, "nll", trained.path, "--n", 0, match="--n must be >= 1")
    one_line_error(
        capsys, "nll", trained.path, "--json", tmp_path / "no" / "r.json", match="does not exist"
    )
    one_line_error(capsys, "nll", trained.path, "--device", "cuda:x", match="--device")
    assert log_lines(trained) == before


@pytest.mark.parametrize("command", ["nll", "sample", "plot"])
def test_commands_refuse_an_unfinished_run_in_one_line(unfinished, capsys, tmp_path, command):
    extra = ["--out", tmp_path / "x.npz"] if command == "sample" else []
    line = one_line_error(capsys, command, unfinished.path, *extra, match="not fully trained")
    assert "2 of 3 block(s) not done: 1 (pending), 2 (pending)" in line
    assert not (unfinished.path / "nll.jsonl").exists()
    assert not (unfinished.path / "plots").exists() and not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("command", ["nll", "sample", "plot"])
def test_commands_refuse_a_missing_run_dir(capsys, tmp_path, command):
    extra = ["--out", tmp_path / "x.png"] if command == "sample" else []
    one_line_error(capsys, command, tmp_path / "nope", *extra, match="does not exist")


# --------------------------------------------------------------------------- sample
def test_sample_npz_holds_the_samples_and_settings(trained, capsys, tmp_path):
    out = tmp_path / "s.npz"
    args = ["sample", trained.path, "-n", 30, "--steps", 10, "--seed", 4, "--no-progress"]
    code, stdout, err = run_cli(capsys, *args, "--out", out)
    assert code == 0, err
    assert stdout.strip() == str(out)
    with np.load(out) as f:
        x, settings = f["samples"], json.loads(str(f["settings"]))
    assert x.shape == (30, 2) and np.isfinite(x).all()
    assert settings["n"] == 30 and settings["method"] == "ode" and settings["seed"] == 4
    assert (settings["solver"], settings["steps"], settings["config_hash"]) == (
        "rk4", 10, trained.hash,
    )  # fmt: skip
    # same seed, same samples; --force overwrites
    code, _, err = run_cli(capsys, *args, "--out", out, "--force")
    assert code == 0, err
    with np.load(out) as f:
        np.testing.assert_array_equal(f["samples"], x)
    code, _, err = run_cli(capsys, *args, "--out", out, "--force", "--method", "sde")
    assert code == 0, err
    with np.load(out) as f:
        assert f["samples"].shape == (30, 2)
        assert json.loads(str(f["settings"]))["solver"] == "euler-maruyama"


def test_sample_png_is_a_valid_image(trained, capsys, tmp_path):
    out = tmp_path / "s.png"
    code, _, err = run_cli(
        capsys, "sample", trained.path, "-n", 40, "--steps", 6, "--out", out, "--no-progress"
    )
    assert code == 0, err
    with Image.open(out) as im:
        im.verify()
        assert im.format == "PNG"


def test_sample_refuses_bad_out_and_does_not_overwrite(trained, capsys, tmp_path):
    one_line_error(
        capsys, "sample", trained.path, "--out", tmp_path / "s.jpg", match="use .npz or .png"
    )
    one_line_error(capsys, "sample", trained.path, "--out", tmp_path / "s", match="no suffix")
    one_line_error(
        capsys, "sample", trained.path, "--out", tmp_path / "no" / "s.npz", match="not exist"
    )
    existing = tmp_path / "old.npz"
    existing.write_bytes(b"keep me")
    one_line_error(capsys, "sample", trained.path, "--out", existing, match="--force")
    assert existing.read_bytes() == b"keep me"
    one_line_error(
        capsys, "sample", trained.path, "--out", tmp_path / "t.npz", "--method", "sde",
        "--solver", "rk4", match="--method ode",
    )  # fmt: skip
    assert not (tmp_path / "t.npz").exists()


# --------------------------------------------------------------------------- plot
def test_plot_writes_the_pngs_and_an_animated_gif(trained, capsys, tmp_path):
    out = tmp_path / "figs"
    code, stdout, err = run_cli(
        capsys, "plot", trained.path, "--out", out, "--grid", 12, "--steps", 8, "--n", 100,
        "--gif-points", 40, "--frames", 5, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    names = ["loss_curves.png", "samples.png", "density.png", "evolution.gif"]
    assert stdout.split() == [str(out / n) for n in names]
    for n in names[:3]:
        with Image.open(out / n) as im:
            im.verify()
            assert im.format == "PNG"
    with Image.open(out / "evolution.gif") as im:
        assert im.format == "GIF" and im.n_frames == 5
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_plot_defaults_to_the_run_folder_and_can_skip_the_gif(trained, capsys):
    code, stdout, err = run_cli(
        capsys, "plot", trained.path, "--grid", 6, "--steps", 4, "--n", 20, "--no-gif",
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    folder = trained.path / "plots"
    assert {p.name for p in folder.iterdir()} == {"loss_curves.png", "samples.png", "density.png"}
    assert len(stdout.split()) == 3
