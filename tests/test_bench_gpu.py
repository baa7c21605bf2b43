"""``psm bench gpu`` and scripts/gpu_check.sh: the no-GPU answer, the CPU code path end to end
(tiny sizes), the appended section, the time caps, and the script's syntax."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from helpers import one_line_error, run_cli
from psm.bench import gpu
from psm.cli import main
from psm.nets import DDPMUNet
from psm.runs.config import load_config, validate_config

ROOT = Path(__file__).parents[1]
QUICK_ROWS = {
    "mlp_k1", "mlp_k4", "cifar_fp32", "cifar_bf16", "cifar_bf16_ema", "ema_update",
    "digits_loop", "digits_stack", "nll_hutchinson", "sample_ode", "cifar_bf16_compile",
}  # fmt: skip
TRAINER_ROWS = {"mlp_k1", "mlp_k4", "cifar_fp32", "cifar_bf16", "cifar_bf16_ema",
                "cifar_bf16_compile", "digits_loop", "digits_stack"}  # fmt: skip
OLD_DOC = "# Benchmarks\n\nWritten earlier; must stay.\n\n<!-- bench:train -->\nold\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``psm bench gpu --cpu --quick`` run, appending to a doc that has content."""
    tmp = tmp_path_factory.mktemp("gpu")
    doc, out = tmp / "benchmarks.md", tmp / "gpu.json"
    doc.write_text(OLD_DOC)
    stdout, stderr = io.StringIO(), io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["bench", "gpu", "--cpu", "--quick", "--no-progress", "--threads", "1",
                     "--json", str(out), "--append", str(doc)])  # fmt: skip
    seconds = time.perf_counter() - t
    result = json.loads(out.read_text()) if out.exists() else None
    return Namespace(code=code, out=stdout.getvalue(), err=stderr.getvalue(), doc=doc,
                     result=result, seconds=seconds)  # fmt: skip


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


# ------------------------------------------------------------------ no GPU
def test_no_cuda_device_is_one_line_and_exit_code_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    line = one_line_error(capsys, "bench", "gpu", "--json", out, match="no CUDA device is present")
    assert "--cpu" in line
    assert not out.exists()


def test_an_existing_json_is_refused_before_measuring(capsys, tmp_path):
    out = tmp_path / "gpu.json"
    out.write_text("keep")
    one_line_error(capsys, "bench", "gpu", "--cpu", "--quick", "--json", out, match="--force")
    assert out.read_text() == "keep"


def test_bad_flags_are_one_line_errors(capsys, tmp_path):
    one_line_error(capsys, "bench", "gpu", "--cpu", "--mlp-blocks", "1,x", match="--mlp-blocks")
    one_line_error(capsys, "bench", "gpu", "--cpu", "--cap", "0", match="--cap")
    missing = tmp_path / "nowhere" / "b.md"
    one_line_error(capsys, "bench", "gpu", "--cpu", "--append", missing, match="does not exist")


# ------------------------------------------------------------------ the CPU path end to end
def test_cpu_quick_runs_every_row_with_sane_values(quick):
    assert quick.code == 0, quick.err
    assert quick.seconds < 60
    r = quick.result
    assert r["complete"] and r["quick"] and r["device"]["type"] == "cpu"
    assert set(r["rows"]) == QUICK_ROWS
    for key, row in r["rows"].items():
        assert "error" not in row and "skipped" not in row, (key, row)
        assert _positive(row["ms_per_step"]) and _positive(row["rate"]), (key, row)
        assert row["peak_mb"] is None  # no CUDA memory on the CPU
        assert row["label"] and row["rate_unit"]
    for key in TRAINER_ROWS:
        row = r["rows"][key]
        assert row["loss_finite"] and row["timed_steps"] >= 1 and row["first_step_s"] > 0
    mlp = r["rows"]["mlp_k4"]
    assert (
        mlp["K"] == 4
        and mlp["params_per_net"]
        == 4 * 100 + 100 + 100 * 150 + 150 + (150 * 100 + 100) + 100 * 2 + 2
    )  # the paper MLP [x, t, t] -> 100 -> 150 -> 100 -> 2
    assert mlp["rate"] == pytest.approx(4e3 / mlp["ms_per_step"])
    tiny = DDPMUNet(channels=3, **{k: v for k, v in gpu.TINY_NET.items() if k != "name"})
    assert r["rows"]["cifar_fp32"]["params"] == sum(p.numel() for p in tiny.parameters())
    assert r["rows"]["ema_update"]["params"] == r["rows"]["cifar_fp32"]["params"]
    assert r["rows"]["cifar_bf16_compile"]["compile_backend"] == "eager"
    for key in ("nll_hutchinson", "sample_ode"):
        row = r["rows"][key]
        assert 1 <= row["rk4_steps_done"] <= row["rk4_steps_aimed"] == 2
        assert _positive(row["s_per_image_rk4_1000"]) and row["images"] == 2
    nll = r["rows"]["nll_hutchinson"]
    if nll["complete"]:
        assert 0 < nll["bpd_untrained"] < 100
    q = r["ratios"]
    for key in ("mlp_k4_vs_mlp_k1", "cifar_bf16_vs_fp32", "cifar_compile_vs_bf16",
                "ema_share_of_step", "digits_stack_vs_loop"):  # fmt: skip
        assert _positive(q[key]), key
    assert math.isfinite(q["ema_ms_per_step"])


def test_cpu_quick_appends_a_section_and_keeps_the_doc(quick):
    text = quick.doc.read_text()
    assert text.startswith(OLD_DOC)
    section = text[len(OLD_DOC) :]
    assert section.count("## GPU check") == 1
    heading = next(x for x in section.splitlines() if x.startswith("## GPU check"))
    assert f"torch {torch.__version__}" in heading and "CPU" in heading
    assert quick.result["machine"]["date"] in heading
    for row in quick.result["rows"].values():
        assert f"| {row['label']} |" in section
    assert section.strip() == quick.out.strip()  # the same table went to stdout


def test_append_never_replaces(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("no newline at the end")
    gpu.append_section(doc, "## first\n\nA\n")
    gpu.append_section(doc, "## second\n\nB")
    assert doc.read_text() == "no newline at the end\n\n## first\n\nA\n\n## second\n\nB\n"
    fresh = tmp_path / "new.md"
    gpu.append_section(fresh, "## only\n")
    assert fresh.read_text() == "## only\n"


# ------------------------------------------------------------------ caps, errors, budget
def test_time_steps_stops_at_the_cap_after_warm_up():
    calls = []

    def step():
        calls.append(1)
        time.sleep(0.002)

    rec = gpu.time_steps(step, torch.device("cpu"), cap=0.05, warmup=3)
    assert len(calls) == 3 + rec["timed_steps"]
    assert 0.05 <= rec["timed_s"] < 2.0 and rec["chunks"] >= 2
    assert rec["ms_per_step"] >= 2.0
    few = gpu.time_steps(step, torch.device("cpu"), cap=10.0, warmup=1, max_steps=4)
    assert few["timed_steps"] == 4


def test_time_solve_cuts_a_long_solve_and_keeps_a_short_one():
    def solve(hook, steps):
        for _ in range(steps):
            time.sleep(0.001)
            hook(0.0, None)
        return "done"

    cut = gpu.time_solve(lambda h: solve(h, 10_000), torch.device("cpu"), steps=10_000, cap=0.02)
    assert not cut["complete"] and 1 <= cut["steps_done"] < 10_000 and cut["value"] is None
    assert cut["ms_per_step"] >= 1.0
    whole = gpu.time_solve(lambda h: solve(h, 3), torch.device("cpu"), steps=3, cap=10.0)
    assert whole["complete"] and whole["steps_done"] == 3 and whole["value"] == "done"


def test_a_failed_row_is_recorded_and_a_spent_budget_skips(monkeypatch):
    def boom(ctx, cap):
        raise RuntimeError("out of memory, say")

    def fine(ctx, cap):
        time.sleep(0.6)
        return {"ms_per_step": 1.0, "rate": 1.0, "rate_unit": "x/s"}

    rows = [
        gpu.Measurement("a", "A", boom),
        gpu.Measurement("b", "B", fine),
        gpu.Measurement("c", "C", fine),
        gpu.Measurement("d", "D", fine, min_budget=1e6),
    ]
    monkeypatch.setattr(gpu, "measurements", lambda sizes, device: rows)
    seen = []
    sizes = gpu.Sizes(budget=0.5, cap=0.01)
    args = Namespace(quick=True, no_progress=True, compile_backend=None)
    result = gpu.run_check(torch.device("cpu"), sizes, args, on_row=lambda r: seen.append(1))
    got = result["rows"]
    assert "out of memory, say" in got["a"]["error"] and "rate" not in got["a"]
    assert got["b"]["rate"] == 1.0 and got["b"]["peak_mb"] is None
    assert "budget" in got["c"]["skipped"] and "budget" in got["d"]["skipped"]
    assert len(seen) == 4 and result["complete"]
    md = gpu.markdown(result)
    assert "error: RuntimeError: out of memory, say" in md and "skipped: time budget" in md


def test_a_failed_row_gives_exit_code_1_with_everything_written(capsys, tmp_path, monkeypatch):
    def boom(ctx, cap):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    rows = [gpu.Measurement("bad", "Bad", boom)]
    monkeypatch.setattr(gpu, "measurements", lambda sizes, device: rows)
    out, doc = tmp_path / "g.json", tmp_path / "b.md"
    code, stdout, err = run_cli(capsys, "bench", "gpu", "--cpu", "--quick", "--no-progress",
                                "--json", out, "--append", doc)  # fmt: skip
    assert code == 1 and "1 row(s) failed: bad" in err
    assert "OutOfMemoryError" in json.loads(out.read_text())["rows"]["bad"]["error"]
    assert "| Bad |" in doc.read_text() and "| Bad |" in stdout


# ------------------------------------------------------------------ configs and the script
@pytest.mark.parametrize(
    ("const", "config"), [("CIFAR_NET", "cifar10_sa.yaml"), ("DIGITS_NET", "digits_sa.yaml")]
)
def test_the_nets_are_the_configs(const, config):
    want = load_config(ROOT / "configs" / "images" / config).net
    assert validate_config({"net": getattr(gpu, const)}).net == want


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_parses():
    script = ROOT / "scripts" / "gpu_check.sh"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = script.read_text()
    assert 'psm" bench gpu "$@"' in text and "pip install" in text
    assert "+cpu" not in text and "download.pytorch.org/whl/cpu" not in text
