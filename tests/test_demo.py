"""psm demo end to end, with a tiny budget."""

from __future__ import annotations

import json
import math
import re

import pytest

from psm.cli import main
from psm.runs.run import Run


@pytest.mark.slow
def test_demo_trains_both_methods_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--seconds", "1", "--n-test", "64", "--steps", "8",
            "--threads", "1", "--grid", "8", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    # a row is flagged (" ⚠") when the machine ran slower than a quiet one: load, not a fault
    assert re.search(r"\| SA-DPM( ⚠)? \| 1 \|", table) and "0.475" in table
    assert re.search(r"\| TPSM-10( ⚠)? \| 10 \|", table)
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["SA-DPM", "TPSM-10"]
    for r in rows:
        assert math.isfinite(r["nll"]) and r["stderr"] > 0 and r["floor"] == 0.475
        assert r["train_seconds"] >= 1.0 and r["block_steps"] >= r["blocks"]
    sa, tpsm = Run.open(out / "runs" / "sa"), Run.open(out / "runs" / "tpsm10")
    assert sa.num_blocks == 1 and tpsm.num_blocks == 10
    assert not sa.ledger.not_done() and not tpsm.ledger.not_done()
    assert all(r["calibration"] > 0 and r["rate"] > 0 for r in rows)
    assert any((out / "plots").glob("*.png"))
    # each score is a psm nll record in its run's nll.jsonl (through the experiments' harness)
    recs = [json.loads((out / "runs" / n / "nll.jsonl").read_text()) for n in ("sa", "tpsm10")]
    assert [(r["nll"], r["n"], r["steps"], r["solver"]) for r in recs] == [
        (row["nll"], 64, 8, "rk4") for row in rows
    ]  # fmt: skip
    # a second call reuses the trained runs and their scores
    steps = [s.step for s in tpsm.ledger.statuses()]
    assert main(argv) == 0
    assert [s.step for s in Run.open(out / "runs" / "tpsm10").ledger.statuses()] == steps
    again = json.loads((out / "results.json").read_text())
    assert [r["nll"] for r in again] == [r["nll"] for r in rows]
    assert all(len((out / "runs" / n / "nll.jsonl").read_text().splitlines()) == 1
               for n in ("sa", "tpsm10"))  # fmt: skip


def test_demo_bad_flags(tmp_path, capsys):
    assert main(["demo", "--seconds", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--seconds must be > 0" in capsys.readouterr().err
    assert main(["demo", "--data", "nope", "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()


def test_demo_flags_a_method_that_trained_far_slower_than_measured():
    from psm.experiments.demo import DemoRow, format_table, speed_notes

    assert speed_notes("SA-DPM", 1, 560.0, 600.0, threads=2) == []
    busy = speed_notes("TPSM-10", 10, 200.0, 700.0, threads=2)
    assert len(busy) == 2 and "29% of the 700 measured just before" in busy[0]
    assert "quiet 2-core machine" in busy[1]
    # a uniformly loaded machine: calibration as slow as training, but far below the reference
    loaded = speed_notes("SA-DPM", 1, 12.0, 12.5, threads=2)
    assert len(loaded) == 1 and "quiet 2-core machine" in loaded[0]
    row = DemoRow("TPSM-10", 10, 342, 3420, 120.0, 1.56, 0.01, 0.475, 3.0, "r", 28.5, 700.0, busy)
    table = format_table([row])
    assert "| TPSM-10 ⚠ | 10 | 342 | 3,420 | 120 s | 28 (700) |" in table and busy[0] in table
