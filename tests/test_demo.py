"""psm demo end to end, with a tiny budget."""

from __future__ import annotations

import json
import math

from psm.cli import main
from psm.run import Run


def test_demo_trains_both_methods_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--seconds", "1", "--n-test", "64", "--steps", "8",
            "--threads", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| SA-DPM | 1 |" in table and "| TPSM-10 | 10 |" in table and "0.475" in table
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["SA-DPM", "TPSM-10"]
    for r in rows:
        assert math.isfinite(r["nll"]) and r["stderr"] > 0 and r["floor"] == 0.475
        assert r["train_seconds"] >= 1.0 and r["block_steps"] >= r["blocks"]
    sa, tpsm = Run.open(out / "runs" / "sa"), Run.open(out / "runs" / "tpsm10")
    assert sa.num_blocks == 1 and tpsm.num_blocks == 10
    assert not sa.unfinished() and not tpsm.unfinished()
    assert any((out / "plots").glob("*.png"))
    # a second call reuses the trained runs and evaluates again
    steps = [s.step for s in tpsm.statuses()]
    assert main(argv) == 0
    assert [s.step for s in Run.open(out / "runs" / "tpsm10").statuses()] == steps


def test_demo_bad_flags(tmp_path, capsys):
    assert main(["demo", "--seconds", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--seconds must be > 0" in capsys.readouterr().err
    assert main(["demo", "--data", "nope", "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()
