"""The registries of executors, partition kinds and processes: a member registered the way a new
one would be is usable from the config and the CLI; psm's earlier flat ``executor:`` section
still loads; options of another executor and unknown names are one-line errors; the one task
body; and the hash of every config under configs/ stays as it was."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import yaml

from helpers import one_line_error, run_cli, tiny_config
from pinned_hashes import PINNED_HASHES
from psm.core.partition import equal
from psm.core.process import PROCESSES, Process, VPSchedule, make_process
from psm.errors import CheckpointError, ConfigError, PSMError
from psm.executors import EXECUTORS, make_executor
from psm.executors.base import Executor, ExecutorSpec
from psm.executors.flags import Flag
from psm.executors.task import run_task
from psm.runs.config import (
    PARTITION_KINDS,
    config_hash,
    legacy_config_hash,
    load_config,
    validate_config,
)
from psm.runs.run import Run
from psm.training.train import BlockOutcome

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


# --------------------------------------------------------------------------- a toy executor
class ToyExecutor(Executor):
    """Trains the blocks in this process, one by one, and remembers what it was given."""

    name = "toy"
    calls: ClassVar[list[tuple[str, list[int]]]] = []

    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    def describe(self) -> str:
        return f"toy ({self.greeting})"

    def run(self, run: Run, blocks: list[int]) -> list[BlockOutcome]:
        ToyExecutor.calls.append((self.greeting, list(blocks)))
        return run_task(run, blocks)


class ToySpec(ExecutorSpec):
    """``executor: {name: toy}``."""

    name: Literal["toy"] = "toy"
    greeting: str = "hello"

    flags = (Flag("--toy-greeting", "greeting", "what the toy says", metavar="WORD"),)

    def build(self, config):
        return ToyExecutor(self.greeting)


@pytest.fixture
def toy():
    """ToySpec registered as a new member would be (one line), removed afterwards."""
    EXECUTORS.register(ToySpec)
    ToyExecutor.calls.clear()
    yield ToyExecutor.calls
    EXECUTORS.unregister(ToySpec)


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(tiny_config(**sections)))
    return path


def test_a_registered_executor_trains_a_run_from_the_cli(tmp_path, capsys, toy):
    cfg = write_config(tmp_path / "c.yaml")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", cfg, "--out", out, "--executor", "toy",
                           "--toy-greeting", "hi", "--no-progress", "--no-plot")  # fmt: skip
    assert code == 0, err
    assert "3/3 block(s) done" in err and "toy (hi)" in err
    assert toy == [("hi", [0, 1, 2])]
    run = Run.open(out)
    assert all(run.ledger.status(b).state == "done" for b in range(3))
    assert run.config.executor.name == "toy"  # the run records the executor it ran with


def test_a_run_trained_by_a_plugin_executor_opens_without_it(tmp_path, capsys, toy):
    """The executor section is not hashed: reading and scoring a run must not need the
    executor that trained it (a plugin registered only where it was trained)."""
    cfg = write_config(tmp_path / "c.yaml")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", cfg, "--out", out, "--executor", "toy",
                           "--no-progress", "--no-plot")  # fmt: skip
    assert code == 0, err
    EXECUTORS.unregister(ToySpec)
    run = Run.open(out)
    assert run.config.executor.name == "local" and run.ledger.not_done() == []
    code, _, err = run_cli(capsys, "nll", out, "--no-progress", "--n", 16, "--steps", 4)
    assert code == 0, err
    assert "toy" in (out / "config.yaml").read_text()  # opening rewrote nothing


def test_a_registered_executor_is_named_in_the_config(tmp_path, capsys, toy):
    cfg = write_config(tmp_path / "c.yaml", executor={"name": "toy", "greeting": "yo"})
    code, _, err = run_cli(capsys, "train", cfg, "--out", tmp_path / "run", "--no-progress",
                           "--no-plot")  # fmt: skip
    assert code == 0 and toy == [("yo", [0, 1, 2])], err
    # --executor switches: the options of the config's own executor stay behind
    cfg = write_config(tmp_path / "d.yaml", executor={"name": "local", "workers": 2})
    code, _, err = run_cli(capsys, "train", cfg, "--out", tmp_path / "run2", "--executor", "toy",
                           "--no-progress", "--no-plot")  # fmt: skip
    assert code == 0 and toy[-1] == ("hello", [0, 1, 2]), err


def test_unknown_executor_names_list_the_registered_ones(tmp_path, capsys, toy):
    cfg = write_config(tmp_path / "c.yaml")
    line = one_line_error(capsys, "train", cfg, "--executor", "dask", match="--executor 'dask'")
    assert line.endswith("choose from ensemble, local, ray, slurm, toy")
    cfg = write_config(tmp_path / "d.yaml", executor={"name": "dask"})
    one_line_error(
        capsys, "train", cfg, match="executor.name: unknown executor 'dask' (choose from "
        "ensemble, local, ray, slurm, toy)",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"^unknown executor 'dask' \(choose from ensemble, "):
        make_executor("dask", validate_config(tiny_config()))
    assert not (tmp_path / "runs").exists()


def test_flags_of_a_registered_executor_are_checked_by_its_spec(tmp_path, capsys):
    class Strict(ExecutorSpec):
        name: Literal["strict"] = "strict"
        size: int = 1

        flags = (Flag("--strict-size", "size", "a size", type=int),)

        def build(self, config):
            return ToyExecutor(str(self.size))

    EXECUTORS.register(Strict)
    try:
        cfg = validate_config(tiny_config())
        assert make_executor("strict", cfg, strict_size=3).greeting == "3"
        with pytest.raises(ConfigError, match=r"^--strict-size: Input should be a valid integer"):
            make_executor("strict", cfg, strict_size="x")
        # another executor's flags are no concern of it
        assert make_executor("strict", cfg, num_cpus=0, workers=9).greeting == "1"
    finally:
        EXECUTORS.unregister(Strict)
    assert "strict" not in EXECUTORS


# --------------------------------------------------------------------------- config sections
FLAT = {  # psm's earlier flat executor section, as every config.yaml of a run held it
    "name": "local", "workers": 1, "ensemble_size": None, "address": None, "local_cpus": None,
    "num_cpus": 1.0, "num_gpus": 0.0, "max_retries": 3, "group_size": None, "lock_wait_s": 150.0,
    "slurm": {"cluster": "slurm", "partition": None, "time_min": 60, "mem_gb": None,
              "cpus_per_task": 1, "gpus_per_node": 0, "account": None, "qos": None,
              "array_parallelism": None, "folder": None, "max_timeouts": 3,
              "signal_delay_s": 90, "setup": [], "extra": {}, "wait": True},
}  # fmt: skip


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (FLAT, {"name": "local"}),
        ({**FLAT, "name": "ensemble", "workers": 2, "ensemble_size": 4},
         {"name": "ensemble", "workers": 2, "ensemble_size": 4}),
        ({**FLAT, "name": "ray", "num_cpus": 2.0, "workers": 3},
         {"name": "ray", "num_cpus": 2.0}),
        # a flat dump may hold options of an executor chosen with --executor: they are dropped
        ({**FLAT, "slurm": {**FLAT["slurm"], "cluster": "local"}}, {"name": "local"}),
        ({"name": "local", "workers": 1, "ensemble_size": 8}, {"name": "local"}),
        # a hand-written section may give other executors' options at their defaults
        ({"name": "slurm", "num_cpus": 1, "workers": 1, "slurm": {"partition": "gpu"}},
         {"name": "slurm", "slurm": {"partition": "gpu"}}),
    ],
)  # fmt: skip
def test_the_flat_executor_section_still_loads(section, expected):
    ex = validate_config(tiny_config(executor=section)).executor
    assert {"name": ex.name} | ex.model_dump(exclude_defaults=True) == expected


def test_old_run_directories_open_and_train(tmp_path, capsys):
    """A run written before the executor registry (its config.yaml holds the flat section,
    here with an option of an executor it did not name) opens, and training it goes on."""
    run_dir = tmp_path / "old"
    shutil.copytree(FIXTURES / "run_974f4eb", run_dir)
    f = run_dir / "config.yaml"
    raw = yaml.safe_load(f.read_text())
    assert set(raw["executor"]) == set(FLAT)
    raw["executor"]["slurm"]["cluster"] = "local"  # not hashed: the hash still holds
    f.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = Run.open(run_dir)
    assert run.hash == raw["config_hash"] and run.config.executor.name == "local"
    code, _, err = run_cli(capsys, "train", FIXTURES / "run_974f4eb.yaml", "--out", run_dir,
                           "--no-progress", "--no-plot")  # fmt: skip
    assert code == 0 and "3/3 block(s) done" in err, err
    assert Run.open(run_dir).hash == raw["config_hash"]


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"num_cpus": 2}, "executor.num_cpus: an option of the ray executor, not of local"),
        ({"name": "ensemble", "slurm": {"partition": "gpu"}},
         "executor.slurm: an option of the slurm executor, not of ensemble"),
        ({"name": "local", "lock_wait_s": 10},
         "executor.lock_wait_s: an option of the ray and slurm executors, not of local"),
        ({"name": "slurm", "workers": 4},
         "executor.workers: an option of the ensemble and local executors, not of slurm"),
        ({"name": "local", "nodes": 4}, "executor.nodes: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_an_option_of_another_executor_is_a_one_line_error(tmp_path, capsys, section, match):
    cfg = write_config(tmp_path / "c.yaml", executor=section)
    one_line_error(capsys, "train", cfg, "--out", tmp_path / "r", match=f"c.yaml: {match}")
    with pytest.raises(ConfigError, match=r"^[^\n]+$"):
        load_config(cfg)
    assert not (tmp_path / "r").exists()


def test_executor_flags_keep_their_meaning():
    cfg = validate_config(tiny_config(executor={"name": "ensemble", "workers": 2}))
    ex = make_executor("ensemble", cfg, max_stack=3)
    assert (ex.workers, ex.max_stack) == (2, 3)
    ex = make_executor("local", cfg, max_stack=3)  # --max-stack is no option of local
    assert ex.workers == 2
    with pytest.raises(ConfigError, match=r"^--max-stack: Input should be greater than or equal"):
        make_executor("ensemble", cfg, max_stack=0)


# --------------------------------------------------------------------------- partitions, processes
def test_a_registered_partition_kind_builds():
    @PARTITION_KINDS.register("halves")
    def halves(p):
        return equal(2, t0=p.t0)

    try:
        cfg = validate_config(tiny_config(partition={"kind": "halves"}))
        assert cfg.partition.build().num_blocks == 2
    finally:
        PARTITION_KINDS.unregister("halves")
    with pytest.raises(ConfigError, match=r"partition.kind: unknown partition kind 'halves' "
                       r"\(choose from auto, equal, geometric, grid, splits\)$"):  # fmt: skip
        validate_config(tiny_config(partition={"kind": "halves"}))


@pytest.mark.parametrize(
    ("partition", "field"),
    [({"kind": "splits"}, "splits"), ({"kind": "geometric", "blocks": 3}, "first"),
     ({"kind": "grid"}, "points")],
)  # fmt: skip
def test_a_partition_kind_names_the_field_it_needs(partition, field):
    message = f"config: partition: partition.{field} is required for kind={partition['kind']}"
    with pytest.raises(ConfigError) as e:
        validate_config(tiny_config(partition=partition))
    assert str(e.value) == message


def test_a_registered_process_builds():
    @PROCESSES.register("vp_steep")
    def steep(*, b_min, b_max, prediction, **_):
        return Process(VPSchedule(b_min, 2 * b_max), prediction or "epsilon", name="vp_steep")

    try:
        cfg = validate_config(tiny_config(process={"name": "vp_steep"}))
        process = cfg.process.build()
        assert process.name == "vp_steep" and process.schedule.b_max == 20.0
        assert make_process("vp_steep").name == "vp_steep"
    finally:
        PROCESSES.unregister("vp_steep")
    with pytest.raises(ValueError, match=r"^unknown process 'vp_steep' \(choose from ot, vp\)$"):
        make_process("vp_steep")


def test_every_config_keeps_its_hash():
    configs = ROOT / "configs"
    found = sorted(str(p.relative_to(configs)) for p in configs.rglob("*.yaml"))
    assert found == sorted(PINNED_HASHES), "a config was added or removed: pin its hash"
    for name, (h, legacy) in PINNED_HASHES.items():
        cfg = load_config(configs / name)
        assert (config_hash(cfg), legacy_config_hash(cfg)) == (h, legacy), name


# --------------------------------------------------------------------------- the task body
def test_the_task_body_stops_after_the_first_interrupted_block(make_run, monkeypatch):
    import psm.training.train as tr

    run = make_run()
    seen = []

    def fake(run_, block):
        seen.append(block)
        if block == 0:
            raise CheckpointError(f"block {block}: checkpoint is truncated")
        return BlockOutcome(block, "interrupted" if block == 1 else "done", step=5)

    monkeypatch.setattr(tr, "train_block", fake)
    outs = run_task(run, [0, 1, 2])
    assert seen == [0, 1]
    assert [(o.block, o.state, o.error) for o in outs] == [
        (0, "failed", "block 0: checkpoint is truncated"),
        (1, "interrupted", None),
        (2, "interrupted", "not run"),
    ]
    with pytest.raises(CheckpointError):  # in the psm process: psm train reports it
        run_task(run, [2, 0], errors="raise")
    assert seen[-2:] == [2, 0]

    def fails(run_, ids, max_stack=None):
        raise PSMError("disk full")

    monkeypatch.setattr(tr, "train_ensemble", fails)
    outs = run_task(run, [2, 0], stacked=True, max_stack=2)
    assert [(o.block, o.state, o.error) for o in outs] == [(2, "failed", "disk full"),
                                                          (0, "failed", "disk full")]  # fmt: skip

    def crashes(run_, block):
        raise RuntimeError("a bug")

    monkeypatch.setattr(tr, "train_block", crashes)
    with pytest.raises(RuntimeError):  # not a PSMError: the engine retries or reports it
        run_task(run, [0])
