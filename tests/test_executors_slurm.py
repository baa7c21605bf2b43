"""The slurm executor through submitit's local and debug executors: a job array from the CLI,
job states in `psm status`, pre-emption with requeue and resume, and the sbatch resources."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from helpers import tiny_config
from psm.cli import main
from psm.errors import ConfigError, PSMError
from psm.executors import make_executor
from psm.executors.slurm_jobs import job_states, parse_sacct, record_jobs
from psm.runs.config import validate_config
from psm.runs.run import Run

submitit = pytest.importorskip("submitit")
from psm.executors.slurm import SlurmExecutor  # noqa: E402


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(tiny_config(**sections)))
    return path


def test_missing_submitit_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)
    cfg = write_config(tmp_path / "c.yaml")
    assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'psm[slurm]'" in err[0]
    assert not (tmp_path / "r").exists()


def test_cli_submits_a_job_array_and_status_shows_the_jobs(tmp_path, capsys):
    """`psm train CONFIG --executor slurm` through submitit's local executor, with --no-wait;
    `psm status` follows the jobs, then shows every block done."""
    cfg = write_config(tmp_path / "c.yaml", partition={"kind": "equal", "blocks": 2},
                       train={"steps": 100, "log_every": 10})  # fmt: skip
    out_dir = tmp_path / "run"
    argv = ["train", str(cfg), "--out", str(out_dir), "--executor", "slurm",
            "--slurm-cluster", "local", "--no-wait", "--no-progress", "--no-plot"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "2 task(s) submitted" in err and "(2 submitted)" in err
    run = Run.open(out_dir)
    deadline = time.time() + 120
    while time.time() < deadline:
        states = job_states(run)
        if all(s.startswith("FINISHED") for s in states.values()):
            break
        assert all(s.split()[0] in ("RUNNING", "FINISHED") for s in states.values()), states
        time.sleep(0.5)
    assert sorted(states) == [0, 1]
    assert main(["status", str(out_dir)]) == 0
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.strip()[:1].isdigit()]
    assert len(rows) == 2 and all(" done " in r and "FINISHED" in r for r in rows), out
    assert " job " in out.splitlines()[1]
    # the same command again: nothing left to train, nothing submitted
    assert main(argv) == 0
    assert "0 to train" in capsys.readouterr().err


@pytest.mark.slow
def test_preempted_task_is_requeued_and_resumes(make_run):
    run = make_run(
        partition={"kind": "equal", "blocks": 1}, net={"hidden": [64, 64]},
        train={"steps": 300, "batch_size": 1024, "log_every": 10, "checkpoint_every": 100},
        executor={"name": "slurm", "slurm": {"cluster": "local", "time_min": 5}},
    )  # fmt: skip
    ex = make_executor("slurm", run.config)
    signalled: dict = {}

    def preempt_mid_block() -> None:  # what SLURM does to a pre-empted task: USR2
        deadline = time.time() + 120
        while time.time() < deadline:
            rec = run.ledger.read(0) or {}
            if rec.get("state") == "running" and rec.get("step", 0) >= 20:
                signalled.update(rec)
                os.kill(rec["pid"], signal.SIGUSR2)
                return
            time.sleep(0.01)

    sender = threading.Thread(target=preempt_mid_block, daemon=True)
    sender.start()
    (out,) = ex.run(run, [0])
    sender.join(timeout=5)
    assert signalled and signalled["step"] < 300, "the block finished before the signal"
    assert out.state == "done" and out.step == 300
    st = run.ledger.read(0)
    # stopped with a checkpoint at the step it reached (not the last periodic one), requeued
    assert st["pid"] != signalled["pid"] and 20 <= st["start_step"] < 300
    (job,) = run.path.joinpath("slurm").glob("*_0_log.out")
    log = job.read_text()
    n = st["start_step"]
    assert f"interrupted at step {n}" in log and "Requeued job" in log
    assert f"from step {n}" in log


def test_debug_cluster_runs_the_array_in_process(make_run):
    run = make_run(train={"steps": 20}, executor={"name": "slurm", "slurm": {"cluster": "debug"}})
    outs = make_executor("slurm", run.config).run(run, [0, 2])
    assert [(o.block, o.state) for o in outs] == [(0, "done"), (2, "done")]
    assert {b: s.split()[0] for b, s in job_states(run).items()} == {0: "FINISHED", 2: "FINISHED"}


def test_resources_from_config_and_flags_reach_sbatch(tmp_path, monkeypatch, capsys):
    cfg = validate_config(tiny_config(executor={"name": "slurm", "slurm": {
        "partition": "gpu", "time_min": 30, "account": "proj", "qos": "high",
        "extra": {"constraint": "a100"}, "setup": ["module load cuda"],
    }}))  # fmt: skip
    # no sbatch on this machine: a one-line error that says what to do, before any write
    monkeypatch.setattr("psm.executors.slurm.shutil.which", lambda name: None)
    with pytest.raises(PSMError, match=r"no sbatch here.*--slurm-cluster local"):
        make_executor("slurm", cfg)
    yaml_cfg = write_config(tmp_path / "c.yaml")
    assert main(["train", str(yaml_cfg), "--out", str(tmp_path / "r"), "--executor", "slurm"]) == 2
    assert "no sbatch" in capsys.readouterr().err and not (tmp_path / "r").exists()
    # with sbatch, the submission script carries the resources of the config and the flags
    monkeypatch.setattr("psm.executors.slurm.shutil.which", lambda name: "/usr/bin/" + name)
    ex = make_executor("slurm", cfg, slurm_gpus=2, slurm_cpus=4, slurm_mem_gb=16,
                       slurm_array_parallelism=3)  # fmt: skip
    assert isinstance(ex, SlurmExecutor) and ex.threads == 4
    assert ex.parameters()["slurm_array_parallelism"] == 3
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    sub = ex.make_submitit_executor(tmp_path)
    text = sub._executor._make_submission_file_text("python -m psm", "uid")
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=2", "--cpus-per-task=4",
                 "--mem=16GB", "--account=proj", "--qos=high", "--constraint=a100",
                 "--signal=USR2@90", "--job-name=psm-tiny"):  # fmt: skip
        assert f"#SBATCH {line}" in text, line
    assert "module load cuda" in text
    with pytest.raises(ConfigError, match=r"^--slurm-time: Input should be greater"):
        make_executor("slurm", cfg, slurm_time=0)


def test_job_states_ask_sacct_and_expand_arrays(make_run, monkeypatch):
    run = make_run()
    record_jobs(run, "slurm", run.path / "slurm", {0: "77_0", 1: "77_1", 2: "77_2"})
    text = "77_0|COMPLETED\n77_[1-2%2]|PENDING\n"
    assert parse_sacct(text) == {"77_0": "COMPLETED", "77_1": "PENDING", "77_2": "PENDING"}
    monkeypatch.setattr("psm.executors.slurm_jobs.shutil.which", lambda name: "/usr/bin/sacct")
    calls = []

    class Done:
        stdout = "77_0|COMPLETED\n77_1|RUNNING\n77_2|CANCELLED by 0\n"

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return Done()

    monkeypatch.setattr("psm.executors.slurm_jobs.subprocess.run", fake_run)
    assert job_states(run) == {0: "COMPLETED 77_0", 1: "RUNNING 77_1", 2: "CANCELLED 77_2"}
    assert calls[0][0] == "sacct" and calls[0][-1] == "77"
    monkeypatch.setattr("psm.executors.slurm_jobs.shutil.which", lambda name: None)
    assert job_states(run)[0] == "? 77_0"  # no sacct here: the job id, state unknown
