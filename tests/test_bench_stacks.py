"""``psm bench stacks``: big stacks against small ones, whole and chunked (tiny sizes), the
section it writes, and its one-line errors."""

from __future__ import annotations

import json
import math

from helpers import one_line_error, run_cli


def test_bench_stacks_measures_both_variants_and_writes_its_section(capsys, tmp_path):
    doc, out = tmp_path / "benchmarks.md", tmp_path / "stacks.json"
    doc.write_text("# Benchmarks\n\nkept\n")
    code, stdout, _ = run_cli(capsys, "bench", "stacks", "--blocks", "2,5", "--stack", "2",
                              "--block-steps", "10", "--rounds", "2", "--batch-size", "16",
                              "--json", out, "--doc", doc)  # fmt: skip
    assert code == 0
    res = json.loads(out.read_text())
    assert [r["K"] for r in res["results"]] == [2, 5]
    assert [r["now_stacks"] for r in res["results"]] == [1, 3]  # 5 blocks: stacks of 2, 1, 2
    assert [r["steps_per_round"] for r in res["results"]] == [5, 2]
    for r in res["results"]:
        assert len(r["paired_now_over_whole"]) == 2
        for key in ("whole_block_steps_per_s", "now_block_steps_per_s", "whole_build_s",
                    "now_build_s", "whole_write_s", "now_write_s"):  # fmt: skip
            assert math.isfinite(r[key]) and r[key] > 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")
    assert "## Big stacks (`psm bench stacks`)" in text
    assert "Big stacks" in stdout


def test_bench_stacks_refuses_bad_block_lists(capsys):
    one_line_error(capsys, "bench", "stacks", "--blocks", "10,x", match="--blocks")
    one_line_error(capsys, "bench", "stacks", "--blocks", "0", match="--blocks")
    one_line_error(capsys, "bench", "stacks", "--stack", "0", match="--stack")
    one_line_error(capsys, "bench", "train", "--blocks", "1,x", match="--blocks")  # same parser
