"""psm compare (issue 20, item 3): runs on the same test points, each difference with its
paired standard error; the statistics checked against numpy, refusals in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from helpers import one_line_error, run_cli, tiny_config
from psm.runs.config import validate_config
from psm.runs.run import Run
from psm.runs.scoring import paired_stats
from psm.training.train import train_ensemble

FAST = ["--no-progress", "--threads", "1"]


def trained(path: Path, **sections) -> Run:
    run = Run.create(validate_config(tiny_config(**sections)), path)
    assert {o.state for o in train_ensemble(run)} == {"done"}
    return run


# --------------------------------------------------------------------------- the statistics
def test_paired_stats_match_numpy():
    rng = np.random.default_rng(3)
    base = rng.normal(2.0, 1.0, 500)
    runs = [base, base + 0.05 + rng.normal(0, 0.1, 500), base - 0.2 + rng.normal(0, 0.3, 500)]
    rows = paired_stats(runs)
    n = len(base)
    for r, row in zip(runs, rows):
        assert row.mean == pytest.approx(np.mean(r), rel=1e-12)
        assert row.stderr == pytest.approx(np.std(r, ddof=1) / math.sqrt(n), rel=1e-12)
        d = r - runs[0]
        assert row.diff == pytest.approx(np.mean(d), abs=1e-12)
    assert rows[0].diff == 0 and math.isnan(rows[0].diff_stderr) and math.isnan(rows[0].z)
    for r, row in zip(runs[1:], rows[1:]):
        d = r - runs[0]
        assert row.diff_stderr == pytest.approx(np.std(d, ddof=1) / math.sqrt(n), rel=1e-12)
        unpaired = math.sqrt(np.var(r, ddof=1) / n + np.var(base, ddof=1) / n)
        assert row.unpaired_stderr == pytest.approx(unpaired, rel=1e-12)
        assert row.z == pytest.approx(row.diff / row.diff_stderr)
        assert row.diff_stderr < row.unpaired_stderr / 3  # correlated errors: pairing pays
    same = paired_stats(np.stack([base, base + 1.0]))  # one array [R, n] works too
    assert same[1].diff == pytest.approx(1.0) and same[1].diff_stderr == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError):
        paired_stats([base, base[:10]])
    with pytest.raises(ValueError):
        paired_stats([base[:1], base[:1]])


# --------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def toys(tmp_path_factory) -> list[Run]:
    """Two TY runs (train seeds 0 and 1) and one HG run, 2 blocks of a [16, 16] MLP."""
    root = tmp_path_factory.mktemp("compare")
    common = {"partition": {"kind": "equal", "blocks": 2}, "eval": {"n_test": 25, "steps": 3}}
    return [
        trained(root / "a", train={"steps": 10, "seed": 0}, **common),
        trained(root / "b", train={"steps": 10, "seed": 1}, **common),
        trained(root / "hg", data={"name": "hg"}, train={"steps": 10}, **common),
    ]


def nll_values(capsys, run: Run, out: Path, *extra) -> tuple[np.ndarray, dict]:
    code, _, err = run_cli(capsys, "nll", run.path, *FAST, "--values", out, *extra)
    assert code == 0, err
    rec = json.loads((run.path / "nll.jsonl").read_text().splitlines()[-1])
    return np.load(out), rec


def test_compare_scores_runs_on_the_same_points(capsys, toys, tmp_path):
    """Each run's value is its psm nll on the first run's test points; the difference's
    paired error is the std of the per-point differences of psm nll --values over sqrt(n);
    reading those files gives the same report."""
    a, b, _ = toys
    code, out, err = run_cli(capsys, "compare", a.path, b.path, *FAST, "--json")
    assert code == 0, err
    report = json.loads(out)
    va, ra = nll_values(capsys, a, tmp_path / "a.npy")
    vb, rb = nll_values(capsys, b, tmp_path / "b.npy")
    assert report["metric"] == "nll" and report["n"] == 25 and report["dataset"] == "ty"
    first, second = report["runs"]
    assert first["value"] == pytest.approx(ra["nll"], rel=1e-12)
    assert second["value"] == pytest.approx(rb["nll"], rel=1e-12)
    assert second["diff"] == pytest.approx(rb["nll"] - ra["nll"], abs=1e-12)
    d = vb - va
    assert second["diff_stderr_paired"] == pytest.approx(np.std(d, ddof=1) / 5, rel=1e-9)
    assert second["diff_stderr_unpaired"] == pytest.approx(math.hypot(ra["stderr"], rb["stderr"]))
    assert first["diff_stderr_paired"] is None and second["source"] == "scored"

    code, out, err = run_cli(capsys, "compare", a.path, b.path, "--values", tmp_path / "a.npy",
                             tmp_path / "b.npy", "--json")  # fmt: skip
    assert code == 0, err
    cached = json.loads(out)["runs"]
    for key in ("value", "stderr", "diff", "diff_stderr_paired", "diff_stderr_unpaired"):
        assert cached[1][key] == pytest.approx(second[key], rel=1e-9)
    assert cached[1]["source"] == "values file"

    code, out, err = run_cli(capsys, "compare", a.path, b.path, "--values", tmp_path / "a.npy",
                             tmp_path / "b.npy")  # fmt: skip
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith(str(b.path)))
    assert f"{second['diff']:+.4f}" in line and f"{second['diff_stderr_paired']:.4f}" in line
    assert "paired s.e." in out.splitlines()[0]


def test_compare_flags_reach_every_run(capsys, toys):
    a, b, _ = toys
    code, out, err = run_cli(capsys, "compare", a.path, b.path, a.path, *FAST, "--json",
                             "--n", "7", "--steps", "2", "--seed", "4")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["n"] == 7 and report["test_seed"] == 4
    assert {r["solver"] for r in report["runs"]} == {"rk4 2 steps"}
    assert report["runs"][2]["diff"] == 0 and report["runs"][2]["diff_stderr_paired"] == 0


def test_compare_digits_in_bits_per_dim(capsys, tmp_path):
    """Image runs compare in bits/dim (psm convention), matching psm nll's records."""
    common = {"data": {"name": "digits"}, "partition": {"kind": "equal", "blocks": 1, "t0": 1e-3},
              "eval": {"n_test": 6, "steps": 2, "test_seed": 5}}  # fmt: skip
    train = {"steps": 3, "batch_size": 8, "log_every": 5, "checkpoint_every": 10}
    runs = [trained(tmp_path / f"d{s}", train={**train, "seed": s}, **common) for s in (0, 1)]
    code, out, err = run_cli(capsys, "compare", *(r.path for r in runs), *FAST, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["metric"] == "bpd" and "psm convention" in report["convention"]
    for i, run in enumerate(runs):
        _, rec = nll_values(capsys, run, tmp_path / f"v{i}.npy")
        assert report["runs"][i]["value"] == pytest.approx(rec["bpd"], rel=1e-12)
        assert report["runs"][i]["stderr"] == pytest.approx(rec["bpd_stderr"], rel=1e-9)


def test_compare_digits_across_data_maps_pairs_the_same_images(capsys, tmp_path):
    """Uniformly dequantized image runs with other data maps (centring, scale) score the same
    images and noise, each through its own map: each figure is its own psm nll's bits/dim."""
    common = {"partition": {"kind": "equal", "blocks": 1, "t0": 1e-3},
              "eval": {"n_test": 6, "steps": 2, "test_seed": 5}}  # fmt: skip
    train = {"steps": 3, "batch_size": 8, "log_every": 5, "checkpoint_every": 10}
    maps = [{"name": "digits"}, {"name": "digits", "center": False, "scale": 1.0}]
    runs = [trained(tmp_path / f"m{i}", train=train, data=d, **common) for i, d in enumerate(maps)]
    code, out, err = run_cli(capsys, "compare", *(r.path for r in runs), *FAST, "--json")
    assert code == 0, err
    report = json.loads(out)
    values = []
    for i, run in enumerate(runs):
        v, rec = nll_values(capsys, run, tmp_path / f"v{i}.npy")
        values.append(run.dataset.bits_per_dim(v))
        assert report["runs"][i]["value"] == pytest.approx(rec["bpd"], rel=1e-12)
    diff = values[1] - values[0]
    assert report["runs"][1]["diff"] == pytest.approx(diff.mean(), rel=1e-9)
    assert report["runs"][1]["diff_stderr_paired"] == pytest.approx(
        diff.std(ddof=1) / np.sqrt(len(diff)), rel=1e-6
    )
    # under truncated-normal dequantization the noise lives in model space: still refused
    one_line_error(capsys, "compare", *(r.path for r in runs), *FAST, "--dequantization",
                   "truncated-normal", match="data.center")  # fmt: skip


def test_compare_refusals(capsys, toys, tmp_path):
    a, b, hg = toys
    one_line_error(capsys, "compare", a.path, *FAST, match="at least two runs")
    one_line_error(capsys, "compare", a.path, hg.path, *FAST,
                   match="test points differ from")  # fmt: skip
    line = one_line_error(capsys, "compare", a.path, hg.path, *FAST, match="data.name")
    assert "'hg' vs 'ty'" in line
    np.save(tmp_path / "v.npy", np.ones(25))
    np.save(tmp_path / "short.npy", np.ones(20))
    np.save(tmp_path / "nan.npy", np.r_[np.ones(24), np.nan])
    np.save(tmp_path / "two.npy", np.ones((25, 2)))
    (tmp_path / "junk.npy").write_bytes(b"junk")
    one_line_error(capsys, "compare", a.path, b.path, "--values", tmp_path / "v.npy",
                   match="1 file(s) for 2 runs")  # fmt: skip
    bad = {
        "short.npy": "different numbers of points",
        "nan.npy": "1 non-finite value",
        "two.npy": "expected NLLs per point",
        "junk.npy": "not a readable .npy",
        "gone.npy": "no such file",
    }
    for name, match in bad.items():
        one_line_error(capsys, "compare", a.path, b.path, "--values", tmp_path / "v.npy",
                       tmp_path / name, match=match)  # fmt: skip


def test_compare_refuses_points_runs_split_differently(capsys, tmp_path):
    """A points file is split by train.seed: runs with other seeds hold other test points."""
    np.save(tmp_path / "p.npy", np.random.default_rng(0).normal(size=(40, 2)))
    data = {"name": "points", "path": str(tmp_path / "p.npy")}
    runs = [
        Run.create(validate_config(tiny_config(data=data, train={"seed": s})), tmp_path / f"r{s}")
        for s in (0, 1)
    ]
    one_line_error(capsys, "compare", *(r.path for r in runs), *FAST,
                   match="the split follows train.seed, 1 vs 0")  # fmt: skip
