"""The ray executor on a local Ray instance with 2 CPUs: a run through the CLI, and a task whose
worker is killed mid-block being retried and resuming from its checkpoint."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
import torch
import yaml

from helpers import tiny_config
from psm.cli import main
from psm.errors import ConfigError, PSMError
from psm.executors import make_executor
from psm.runs.checkpoint import load_weights
from psm.runs.config import validate_config
from psm.runs.run import Run
from psm.training.train import BlockProblem

ray = pytest.importorskip("ray")
from psm.executors.ray import RayExecutor  # noqa: E402


@pytest.fixture(autouse=True)
def no_ray_left_running():
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_missing_ray_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(PSMError, match=r"pip install 'psm\[ray\]'"):
        make_executor("ray", validate_config(tiny_config()))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config()))
    assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "psm[ray]" in err[0]
    assert not (tmp_path / "r").exists()


def test_flags_override_the_config():
    cfg = validate_config(tiny_config(executor={"name": "ray", "num_cpus": 2, "max_retries": 1}))
    ex = make_executor("ray", cfg, num_gpus=0.5, group_size=4, workers=3, max_stack=2)
    assert (ex.num_cpus, ex.num_gpus, ex.max_retries, ex.group_size) == (2, 0.5, 1, 4)
    assert (ex.local_cpus, ex.max_stack, ex.threads, ex.address) == (6, 2, 2, None)
    assert make_executor("ray", cfg, address="auto").local_cpus is None
    with pytest.raises(ConfigError, match=r"^--num-cpus: Input should be greater than 0$"):
        make_executor("ray", cfg, num_cpus=0)


@pytest.mark.slow
def test_cli_trains_a_run_on_a_local_ray(tmp_path, capsys):
    """`psm train CONFIG --executor ray` on a local 2-CPU instance: one block per task and a
    stacked group of two; progress and status come from the run directory."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(train={"steps": 100, "log_every": 10})))
    out_dir = tmp_path / "run"
    argv = ["train", str(cfg), "--out", str(out_dir), "--executor", "ray", "--local-cpus", "2",
            "--group-size", "2", "--no-plot"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "3/3 block(s) done" in err and "ray: local instance (2 CPUs)" in err
    assert "300/300" in err  # the progress bar, fed from the status files the tasks write
    assert not ray.is_initialized()  # the instance psm started is gone
    run = Run.open(out_dir)
    for b in range(3):
        assert load_weights(run, b, BlockProblem.build(run, b).new_net()) == 100
    assert main(["status", str(out_dir)]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.strip()[:1].isdigit()]
    assert len(rows) == 3 and all(" done " in r and "100/100" in r for r in rows)


@pytest.mark.slow
def test_killed_worker_is_retried_and_resumes(make_run):
    run = make_run(
        partition={"kind": "equal", "blocks": 1},
        train={"steps": 300, "log_every": 10, "checkpoint_every": 50},
    )

    def slow_steps() -> None:
        """Worker setup hook: each step takes >= 20 ms, so the test can act mid-block even on a
        busy machine (a 5 s window). (Nested, so Ray ships it by value: the workers cannot
        import this test module.)"""
        import time as _time

        import psm.training.train as tr

        draw = tr.BlockProblem.draw_batch

        def slow(self, generator):
            _time.sleep(0.02)
            return draw(self, generator)

        tr.BlockProblem.draw_batch = slow

    ex = RayExecutor(
        local_cpus=2, max_retries=2, runtime_env={"worker_process_setup_hook": slow_steps}
    )
    killed: dict = {}
    finished = threading.Event()

    def kill_mid_block() -> None:
        # no deadline of its own: on a loaded machine Ray can take minutes to start a worker
        while not finished.is_set():
            rec = run.ledger.read(0) or {}
            if rec.get("state") == "running" and (rec.get("checkpoint_step") or 0) >= 50:
                killed.update(rec)
                os.kill(rec["pid"], signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_mid_block, daemon=True)
    killer.start()
    try:
        (out,) = ex.run(run, [0])
    finally:
        finished.set()
    killer.join(timeout=5)
    assert killed and killed["step"] < 300, "the block finished before its worker was killed"
    assert out.state == "done" and out.step == 300
    st = run.ledger.read(0)
    assert st["pid"] != killed["pid"]  # finished by the retry, in another worker
    assert st["start_step"] >= killed["checkpoint_step"] >= 50  # resumed, not restarted
    net = BlockProblem.build(run, 0).new_net()
    assert load_weights(run, 0, net) == 300
    assert torch.isfinite(net(torch.randn(4, 2), torch.full((4,), 0.3))).all()
