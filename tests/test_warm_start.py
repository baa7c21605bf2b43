"""Warm starts (``train.init_from``): blocks start from a trained run's final weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import one_line_error, tiny_config
from psm.errors import RunError
from psm.runs.config import config_hash, validate_config
from psm.runs.run import Run
from psm.runs.warm_start import INIT_FILE, InitFromError, read_record
from psm.training.train import StackTrainer, train_block, train_ensemble


def final(run: Run, block: int) -> dict[str, torch.Tensor]:
    return load_file(run.layout.weights(block))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def step0(run: Run) -> list[dict[str, torch.Tensor]]:
    """Each block's weights at step 0, as the trainer holds them."""
    tr = StackTrainer(run, list(range(run.num_blocks)))
    return [{k: v.detach().clone() for k, v in tr.stack.net_state(k).items()}
            for k in range(run.num_blocks)]  # fmt: skip


def snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture
def sa(make_run, tmp_path):
    """A trained SA-DPM source (one block)."""
    run = make_run(path=tmp_path / "sa", partition={"blocks": 1})
    assert train_block(run, 0).state == "done"
    return run


@pytest.fixture
def k3(make_run, tmp_path):
    """A trained 3-block source."""
    run = make_run(path=tmp_path / "k3", train={"seed": 7})
    assert all(o.state == "done" for o in train_ensemble(run))
    return run


def test_sa_source_starts_every_block(make_run, sa):
    warm = make_run(train={"init_from": str(sa.path)})
    src = final(sa, 0)
    nets = step0(warm)
    assert all(same(n, src) for n in nets)
    cold = step0(make_run())
    assert not same(cold[0], src)
    rec = warm.ledger.status(2).init_from
    assert rec == {"run": str(sa.path.resolve()), "hash": sa.hash, "block": 0}
    stored = read_record(warm.path)
    assert stored["map"] == [0, 0, 0] and stored["config_hash"] == sa.hash
    # trained from there: each block moves away from the shared start, Adam fresh
    outs = train_ensemble(warm)
    assert [o.state for o in outs] == ["done"] * 3
    assert not same(final(warm, 1), src)


def test_same_k_source_maps_block_to_block(make_run, k3):
    warm = make_run(train={"init_from": str(k3.path)})
    nets = step0(warm)
    for b in range(3):
        assert same(nets[b], final(k3, b))
    assert not same(nets[0], final(k3, 1))


def test_time_match_gives_each_block_its_neighbour_in_time(make_run, k3, tmp_path):
    """``RUN:time``: a 5-block run over other splits starts each block from the source block
    that owns the middle of its range; the hash covers the match; mixing it with a block is
    refused."""
    from psm.core.partition import Partition
    from psm.runs.config import InitFrom
    from psm.runs.warm_start import block_map

    # k3 is 3 equal blocks {0, 1/3, 2/3, 1}; these middles: 0.05, 0.25, 0.4, 0.65, 0.85
    splits = {"kind": "splits", "splits": [0, 0.1, 0.3, 0.5, 0.8, 1.0]}
    warm = make_run(partition=splits, train={"init_from": f"{k3.path}:time"})
    assert read_record(warm.path)["map"] == [0, 0, 1, 1, 2]
    nets = step0(warm)
    for b, sb in enumerate([0, 0, 1, 1, 2]):
        assert same(nets[b], final(k3, sb))
    plain = make_run(partition=splits)
    assert warm.hash != plain.hash
    assert (
        yaml.safe_load((warm.path / "config.yaml").read_text())["train"]["init_from"]["match"]
        == "time"
    )
    # a DPSM grid target: each block from the source block owning its time point (floored at t0)
    spec = InitFrom.model_validate(f"{k3.path}:time")
    grid = Partition((0.0, 0.2, 0.5, 0.9, 1.0), kind="grid", t0=0.01)
    assert block_map(spec, k3.partition, grid) == [0, 1, 2, 2]
    assert block_map(spec, grid, k3.partition) == [0, 1, 2]  # any partition as the source
    with pytest.raises(ValueError, match="not both"):
        InitFrom.model_validate({"run": str(k3.path), "block": 1, "match": "time"})
    # the same problem under another source mapping is another hash
    same_k = make_run(train={"init_from": f"{k3.path}:time"})
    assert same_k.hash != make_run(train={"init_from": str(k3.path)}).hash
    assert read_record(same_k.path)["map"] == [0, 1, 2]


def test_run_block_gives_every_block_that_block(make_run, k3):
    warm = make_run(partition={"blocks": 2}, train={"init_from": f"{k3.path}:1"})
    assert warm.config.train.init_from.block == 1
    assert all(same(n, final(k3, 1)) for n in step0(warm))
    assert warm.ledger.status(0).init_from["block"] == 1


def test_ema_source_gives_its_inference_weights(make_run, tmp_path):
    src = make_run(path=tmp_path / "ema", partition={"blocks": 1}, train={"ema": 0.9})
    train_block(src, 0)
    raw = {k[4:]: v for k, v in load_file(src.layout.state(0)).items() if k.startswith("net.")}
    assert not same(raw, final(src, 0))  # the final file holds the EMA
    warm = make_run(train={"init_from": str(src.path)})
    assert all(same(n, final(src, 0)) for n in step0(warm))


def test_hash_covers_the_source_hash_not_its_path(make_run, sa, tmp_path):
    cold = make_run()
    warm = make_run(train={"init_from": str(sa.path)})
    assert warm.hash != cold.hash
    assert warm.config.train.init_from.hash == sa.hash
    assert Run.open(warm.path).hash == warm.hash  # a pure function of the stored config
    assert config_hash(warm.config) == warm.hash
    moved = tmp_path / "moved"
    shutil.copytree(sa.path, moved)
    again = make_run(train={"init_from": str(moved)})
    assert again.hash == warm.hash  # moving the source changes nothing
    other = make_run(path=tmp_path / "sa2", partition={"blocks": 1}, train={"seed": 3})
    train_block(other, 0)
    assert make_run(train={"init_from": str(other.path)}).hash != warm.hash
    assert make_run(train={"init_from": f"{sa.path}:0"}).hash != warm.hash  # another map


def test_default_keeps_the_hash():
    raw = tiny_config()
    assert "init_from" not in str(validate_config(raw).train.model_dump(exclude_none=True))
    plain = config_hash(validate_config(raw))
    raw["train"]["init_from"] = None
    assert config_hash(validate_config(raw)) == plain


def test_reopen_and_moved_source(make_run, sa, tmp_path):
    path = tmp_path / "warm"
    warm = make_run(path=path, train={"init_from": str(sa.path)})
    again = make_run(path=path, train={"init_from": str(sa.path), "steps": 30})
    assert again.hash == warm.hash
    moved = tmp_path / "moved"
    shutil.copytree(sa.path, moved)
    shutil.rmtree(sa.path)
    with pytest.raises(InitFromError, match="does not exist"):
        make_run(path=path, train={"init_from": str(sa.path)})
    again = make_run(path=path, train={"init_from": str(moved)})
    assert again.hash == warm.hash
    assert read_record(path)["run"] == str(moved.resolve())
    train_ensemble(again)
    assert all(r.init_from["run"] == str(moved.resolve()) for r in again.ledger.statuses())


def test_retrained_source_is_refused_and_nothing_touched(make_run, sa, tmp_path):
    path = tmp_path / "warm"
    make_run(path=path, train={"init_from": str(sa.path)})
    before = snapshot(path)
    make_run(path=sa.path, partition={"blocks": 1}, train={"steps": 30})
    train_block(sa.path, 0)  # same config, new weights
    with pytest.raises(InitFromError) as e:
        make_run(path=path, train={"init_from": str(sa.path)})
    msg = str(e.value)
    assert "\n" not in msg and str(sa.path) in msg and "changed" in msg and "weights" in msg
    assert snapshot(path) == before
    # a worker never loads it either
    with pytest.raises(InitFromError, match="changed"):
        step0(Run.open(path))


def test_source_under_another_config_is_refused(make_run, sa, tmp_path):
    path = tmp_path / "warm"
    make_run(path=path, train={"init_from": str(sa.path)})
    before = snapshot(path)
    shutil.rmtree(sa.path)
    other = make_run(path=sa.path, partition={"blocks": 1}, train={"seed": 5})
    train_block(other, 0)
    with pytest.raises(InitFromError, match="config hash") as e:
        make_run(path=path, train={"init_from": str(sa.path)})
    assert "\n" not in str(e.value) and other.hash in str(e.value)
    assert snapshot(path) == before


def test_source_no_longer_read_once_every_block_started(make_run, sa, tmp_path):
    path = tmp_path / "warm"
    train_ensemble(make_run(path=path, train={"init_from": str(sa.path)}))
    shutil.rmtree(sa.path)  # every block holds a checkpoint: extending needs no source
    longer = make_run(path=path, train={"init_from": str(sa.path), "steps": 30})
    assert [o.step for o in train_ensemble(longer)] == [30] * 3


def test_resume_continues_from_the_checkpoint(make_run, sa, tmp_path):
    straight = make_run(path=tmp_path / "a", train={"init_from": str(sa.path), "steps": 40})
    train_block(straight, 1)
    part = make_run(path=tmp_path / "b", train={"init_from": str(sa.path), "steps": 20})
    train_block(part, 1)
    at20 = final(part, 1)
    longer = make_run(path=tmp_path / "b", train={"init_from": str(sa.path), "steps": 40})
    tr = StackTrainer(longer, [1])
    assert tr.step == 20
    resumed = tr.stack.net_state(0)
    assert not same(resumed, final(sa, 0))
    assert train_block(longer, 1).step == 40
    assert same(final(straight, 1), final(longer, 1))
    assert not same(at20, final(longer, 1))


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"partition": {"blocks": 2}}, "has 3 blocks and this run 2"),
        ({"init": ":9"}, "no block 9"),
        ({"partition": {"kind": "grid", "points": 3}}, "does not fit"),
        ({"net": {"hidden": [8, 16]}}, "does not fit"),
    ],
)
def test_unusable_sources_are_refused_before_any_write(k3, tmp_path, sections, match):
    sections = dict(sections)
    suffix = sections.pop("init", "")
    raw = tiny_config(train={"init_from": f"{k3.path}{suffix}"}, **sections)
    path = tmp_path / "new"
    with pytest.raises(InitFromError, match=match) as e:
        Run.create(validate_config(raw), path)
    assert "\n" not in str(e.value)
    assert not path.exists()


def test_unfinished_or_missing_source_is_refused(make_run, tmp_path):
    src = make_run(path=tmp_path / "src", partition={"blocks": 1})
    path = tmp_path / "new"
    with pytest.raises(InitFromError, match="not done"):
        make_run(path=path, train={"init_from": str(src.path)})
    train_block(src, 0)
    src.layout.weights(0).unlink()
    with pytest.raises(InitFromError, match="not done"):
        make_run(path=path, train={"init_from": str(src.path)})
    with pytest.raises(InitFromError, match="does not exist"):
        make_run(path=path, train={"init_from": str(tmp_path / "nowhere")})
    assert not path.exists()
    assert issubclass(InitFromError, RunError)


def _config_file(tmp_path: Path, **sections) -> Path:
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(tiny_config(**sections)))
    return f


def test_cli_refuses_a_bad_source(capsys, tmp_path, k3):
    cfg = _config_file(tmp_path, partition={"blocks": 2})
    out = tmp_path / "cli"
    for source, match in [(tmp_path / "nowhere", "does not exist"),
                          (k3.path, "has 3 blocks and this run 2")]:  # fmt: skip
        for dry in ([], ["--dry-run"]):
            one_line_error(
                capsys, "train", cfg, "--out", out, "--set", f"train.init_from={source}",
                "--no-progress", "--no-plot", *dry, match=match,
            )  # fmt: skip
            assert not out.exists()


def test_cli_trains_and_reports_a_warm_start(capsys, tmp_path, sa):
    from helpers import run_cli

    cfg = _config_file(tmp_path)
    out = tmp_path / "cli"
    argv = ["train", cfg, "--out", out, "--set", f"train.init_from={sa.path}", "--no-progress",
            "--no-plot", "--executor", "ensemble"]  # fmt: skip
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert (out / INIT_FILE).is_file()
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["train"]["init_from"] == {
        "run": str(sa.path), "block": None, "match": None, "hash": sa.hash
    }  # fmt: skip
    code, _, err = run_cli(capsys, *argv, "--steps", "30")  # extend: the same run
    assert code == 0, err
    code, text, _ = run_cli(capsys, "status", out)
    assert f"warm start: from {sa.path} (config {sa.hash}" in text
