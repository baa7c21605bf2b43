"""Progress in a log: plain lines every few seconds and a final one (no carriage returns) when
the bar's stream is not a terminal; tqdm on a terminal; PSM_PROGRESS overrides."""

from __future__ import annotations

import io
import re
import sys
import time

import pytest
import torch
import yaml
from tqdm.std import tqdm as std_tqdm

import psm.progress as progress
from helpers import tiny_config
from psm.core.ode import SolverSettings
from psm.core.partition import equal
from psm.core.process import make_process
from psm.core.sample import sample
from psm.errors import PSMError
from psm.progress import PlainBar, make_bar, progress_bar, progress_mode
from test_likelihood import GAUSS, exact_model

LINE = re.compile(
    r"^(?P<desc>[^:]+): (?P<n>[\d,]+)/(?P<total>[\d,]+) (?P<units>[\w-]+) \((?P<pct>\d+)%\)"
    r"(, (?P<rate>[\d.,]+) [\w-]+/s)?, \d+:\d\d elapsed(, ~\d+:\d\d left)?( \[.*\])?$"
)
FINAL = re.compile(
    r"^(?P<desc>[^:]+): (finished|stopped at) (?P<n>[\d,]+)/(?P<total>[\d,]+) [\w-]+ "
    r"\(\d+%\) in \d+:\d\d(, [\d.,]+ [\w-]+/s)?( \[.*\])?$"
)


class Clock:
    """A stand-in for time.monotonic in psm.progress."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


@pytest.fixture(autouse=True)
def auto_mode(monkeypatch):
    monkeypatch.delenv("PSM_PROGRESS", raising=False)
    monkeypatch.delenv("PSM_PROGRESS_INTERVAL", raising=False)


def test_the_stream_decides_and_the_environment_overrides(monkeypatch):
    log, tty = io.StringIO(), Terminal()
    assert progress_mode(log) == "plain" and progress_mode(tty) == "bar"
    assert isinstance(make_bar(10, desc="x", file=log), PlainBar)
    bar = make_bar(10, desc="x", file=tty)
    assert isinstance(bar, std_tqdm) and not bar.disable
    bar.close()
    monkeypatch.setenv("PSM_PROGRESS", "bar")
    assert progress_mode(log) == "bar"
    monkeypatch.setenv("PSM_PROGRESS", "plain")
    assert progress_mode(tty) == "plain"
    monkeypatch.setenv("PSM_PROGRESS", "off")
    bar = make_bar(10, desc="x", file=tty)
    assert bar.disable
    with progress_bar("NLL") as pb:
        assert pb is None
    monkeypatch.setenv("PSM_PROGRESS", "fancy")
    with pytest.raises(PSMError, match="PSM_PROGRESS='fancy': choose from auto, bar, plain, off"):
        progress_mode(log)
    monkeypatch.setenv("PSM_PROGRESS", "plain")
    monkeypatch.setenv("PSM_PROGRESS_INTERVAL", "-1")
    with pytest.raises(PSMError, match="PSM_PROGRESS_INTERVAL"):
        make_bar(10, file=log)
    assert make_bar(10, file=log, disable=True).disable  # disabled: no check, nothing shown


def test_plain_lines_every_interval_then_a_final_line(clock):
    log = io.StringIO()
    with make_bar(5000, desc="train block 3", unit="step", file=log) as bar:
        assert bar.interval == 5.0
        for _ in range(50):  # 100 steps per second for 50 s: a line every 5 s
            clock.t += 1.0
            bar.update(100)
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 10  # at 5, 10, ..., 45 s; at 50 s the total: the final line only
    first = LINE.match(lines[0])
    assert first is not None, lines[0]
    assert (first["desc"], first["n"], first["total"], first["units"], first["pct"]) == (
        "train block 3",
        "500",
        "5,000",
        "steps",
        "10",
    )
    assert first["rate"] == "100"  # steps per second since the previous line
    assert lines[0].endswith("0:05 elapsed, ~0:45 left")
    assert all(LINE.match(x) for x in lines[:-1]), lines
    assert lines[-1] == "train block 3: finished 5,000/5,000 steps (100%) in 0:50, 100 step/s"


def test_a_short_bar_writes_one_line_and_an_idle_one_none(clock):
    log = io.StringIO()
    with make_bar(40, desc="density", unit="pt", file=log, leave=False) as bar:
        clock.t += 1.5
        bar.update(30)
        bar.set_postfix_str("batch 2/2", refresh=False)
    assert log.getvalue() == "density: stopped at 30/40 pts (75%) in 0:02, 20.0 pt/s [batch 2/2]\n"
    idle = io.StringIO()
    with make_bar(40, desc="idle", file=idle):
        clock.t += 20
    assert idle.getvalue() == ""


def test_a_polled_count_is_measured_from_the_first_refresh(clock):
    """The training monitor sets ``n`` from the status files: a resumed run's earlier steps
    are not counted in the rate, and the budget bar (unit seconds) shows no rate."""
    log = io.StringIO()
    bar = make_bar(3000, desc="train tiny", unit="block-step", file=log)
    bar.n = 1000  # resumed: 1000 block-steps done before this call
    bar.refresh()
    clock.t += 10.0
    bar.n = 1500
    bar.set_postfix_str("running 3")
    clock.t += 10.0
    bar.n = 3000
    bar.set_postfix_str("done 3", refresh=False)
    bar.close()
    bar.close()  # a second close writes nothing more
    lines = log.getvalue().splitlines()
    assert lines == [
        "train tiny: 1,500/3,000 block-steps (50%), 50.0 block-step/s, 0:10 elapsed, ~0:30 left "
        "[running 3]",
        "train tiny: finished 3,000/3,000 block-steps (100%) in 0:20, 100 block-step/s [done 3]",
    ]
    seconds = io.StringIO()
    with make_bar(60, desc="train budget", unit="s", file=seconds) as bar:
        clock.t += 6.0
        bar.n = 6
        bar.refresh()
    assert seconds.getvalue().splitlines()[0] == "train budget: 6/60 s (10%), 0:06 elapsed"


def test_the_samplers_bar_prints_plain_lines_to_a_captured_stderr(capsys, monkeypatch):
    """progress_bar through the core sampler, stderr captured (not a terminal)."""
    monkeypatch.setenv("PSM_PROGRESS_INTERVAL", "0.000001")  # a line at every step
    model = exact_model(GAUSS, make_process("vp"), equal(2), shape=(2,))
    with progress_bar("sample (ode)") as bar:
        sample(model, 6, generator=torch.Generator(), solver=SolverSettings("rk4", 8),
               batch_size=4, progress=bar)  # fmt: skip
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 1 < len(lines) <= 17  # 16 solver steps, then the final line
    assert all(LINE.match(x) and x.startswith("sample (ode): ") for x in lines[:-1]), lines
    assert FINAL.match(lines[-1]) and "16/16 steps (100%)" in lines[-1], lines[-1]


def test_psm_train_into_a_log_file_writes_few_plain_lines(tmp_path, monkeypatch):
    """``psm train`` (in this process) with stderr a file, as ``make demo > demo.log 2>&1``:
    at most one line per 5 s of training, a final line, no carriage return."""
    from psm.cli import main

    cfg = tmp_path / "c.yaml"
    train = {"steps": 20, "log_every": 10, "checkpoint_every": 20, "heldout_every": 0}
    part = {"kind": "equal", "blocks": 2}
    cfg.write_text(yaml.safe_dump(tiny_config(train=train, partition=part)))
    log = tmp_path / "train.log"
    with log.open("w") as f:
        monkeypatch.setattr(sys, "stderr", f)
        t0 = time.monotonic()
        code = main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-plot"])
        elapsed = time.monotonic() - t0
    text = log.read_text()
    assert code == 0, text
    assert "\r" not in text and "\x1b" not in text
    bar_lines = [x for x in text.splitlines() if x.startswith("train tiny: ")]
    assert bar_lines and FINAL.match(bar_lines[-1]), text
    assert "finished 40/40 block-steps (100%)" in bar_lines[-1]
    assert all(LINE.match(x) for x in bar_lines[:-1]), bar_lines
    assert len(bar_lines) <= elapsed / progress.DEFAULT_INTERVAL + 2, text
