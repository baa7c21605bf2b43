"""The seams images need: parts registered from outside config.py, shapes instead of dims, one
training loop with dropout, psm 0.1 runs that still load, and math that stays off the disk."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import run_cli, tiny_config
from psm.data import DATASETS, Dataset, DataSpec
from psm.nets import NETS, NetSpec
from psm.runs.config import config_hash, load_config, validate_config
from psm.runs.run import Run
from psm.training.train import train_block, train_ensemble

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


# ------------------------------------------------------------------ parts registered in a test
class GaussImages(Dataset):
    """Images ``N(0, 0.25 I)`` of shape (1, 8, 8): a closed-form stand-in for digits."""

    name = "gauss_images"
    shape = (1, 8, 8)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return 0.5 * torch.randn((n, *self.shape), generator=generator, device=generator.device)


class GaussImagesSpec(DataSpec):
    name: Literal["gauss_images"] = "gauss_images"

    def build(self, *, seed: int) -> Dataset:
        return GaussImages()


class TinyConv(nn.Module):
    """``[x, t] -> conv -> ELU -> dropout -> conv``: a conv net with a random layer, no
    stacked_forward of its own (so stacks go through vmap)."""

    def __init__(self, channels: int, time_conditioned: bool, dropout: float) -> None:
        super().__init__()
        self.time_conditioned = time_conditioned
        extra = 1 if time_conditioned else 0
        self.inp = nn.Conv2d(channels + extra, 8, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.time_conditioned:
            x = torch.cat([x, t[:, None, None, None].expand(-1, 1, *x.shape[2:])], dim=1)
        return self.out(self.drop(nn.functional.elu(self.inp(x))))


class TinyConvSpec(NetSpec):
    name: Literal["tinyconv"] = "tinyconv"
    dropout: float = 0.0

    def build(self, shape: tuple[int, ...], *, time_conditioned: bool) -> nn.Module:
        if len(shape) != 3:
            raise ValueError(f"tinyconv takes images (C, H, W), not {shape}")
        return TinyConv(shape[0], time_conditioned, self.dropout)


@pytest.fixture
def registered():
    """The test's dataset and net, registered the way a new part is: one line each."""
    DATASETS.register(GaussImagesSpec)
    NETS.register(TinyConvSpec)
    yield
    DATASETS.unregister(GaussImagesSpec)
    NETS.unregister(TinyConvSpec)


def image_config(tmp_path: Path, **train) -> Path:
    raw = tiny_config(
        data={"name": "gauss_images"},
        train={"batch_size": 16, **train},
        eval={"n_test": 16, "steps": 6},
    )
    raw["net"] = {"name": "tinyconv", "dropout": 0.1}
    path = tmp_path / "images.yaml"
    path.write_text(json.dumps(raw))  # YAML is a superset of JSON
    return path


def test_image_shaped_data_flows_through_training_likelihood_and_sampling(
    registered, tmp_path, capsys
):
    cfg = load_config(image_config(tmp_path))
    assert cfg.data.name == "gauss_images" and cfg.net.name == "tinyconv"
    one = Run.create(cfg, tmp_path / "one")
    assert [train_block(one, b).state for b in range(3)] == ["done"] * 3
    stacked = Run.create(cfg, tmp_path / "stacked")
    assert [o.state for o in train_ensemble(stacked)] == ["done"] * 3
    assert stacked.shape == (1, 8, 8) and json.loads((stacked.path / "data.json").read_text())[
        "shape"
    ] == [1, 8, 8]

    code, out, err = run_cli(
        capsys, "nll", stacked.path, "--trace", "hutchinson", "--n", 16, "--no-progress"
    )
    assert code == 0, err
    nll = float(out.split("NLL ")[1].split(" ")[0])
    assert math.isfinite(nll) and "hutchinson trace" in out

    npz = tmp_path / "s.npz"
    code, _, err = run_cli(
        capsys, "sample", stacked.path, "-n", 5, "--steps", 6, "--out", npz, "--no-progress"
    )
    assert code == 0, err
    import numpy as np

    x = np.load(npz)["samples"]
    assert x.shape == (5, 1, 8, 8) and np.isfinite(x).all()
    # the 2D-only figures refuse other shapes in one line
    code, _, err = run_cli(capsys, "sample", stacked.path, "--out", tmp_path / "s.png")
    assert code == 2 and "shape (1, 8, 8)" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "plot", stacked.path)
    assert code == 2 and "shape (1, 8, 8)" in err and len(err.strip().splitlines()) == 1


def test_dropout_in_a_stack_keeps_each_blocks_batches_and_init(registered, tmp_path):
    """With dropout the ensemble no longer equals one-by-one training (one global generator
    serves the stack's masks), but each block's initial weights and its stream of batches are
    still a pure function of its seed, and K = 1 resumes bit for bit."""
    cfg = load_config(image_config(tmp_path))
    one, stacked = Run.create(cfg, tmp_path / "one"), Run.create(cfg, tmp_path / "stk")
    for b in range(3):
        train_block(one, b)
    train_ensemble(stacked)
    for b in range(3):
        s1, s2 = load_file(one.layout.state(b)), load_file(stacked.layout.state(b))
        assert torch.equal(s1["rng"], s2["rng"])  # the same batches were drawn
        assert "rng_global" in s1 and "rng_global" in s2  # dropout masks' generator kept
    w1, w2 = load_file(one.layout.weights(0)), load_file(stacked.layout.weights(0))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # masks differ: weights differ

    straight = Run.create(load_config(image_config(tmp_path, steps=20)), tmp_path / "straight")
    train_block(straight, 1)
    resumed = Run.create(load_config(image_config(tmp_path, steps=10)), tmp_path / "resumed")
    train_block(resumed, 1)
    resumed = Run.create(load_config(image_config(tmp_path, steps=20)), tmp_path / "resumed")
    train_block(resumed, 1)
    a, b = load_file(straight.layout.weights(1)), load_file(resumed.layout.weights(1))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mlp_with_dropout_trains_stacked(make_run):
    run = make_run(net={"hidden": [16, 16], "dropout": 0.2})
    outs = train_ensemble(run)
    assert [o.state for o in outs] == ["done"] * 3
    assert all(math.isfinite(o.last_loss) for o in outs)


def test_a_net_that_cannot_take_the_shape_is_a_clear_error(registered, tmp_path, capsys):
    raw = tiny_config()
    raw["net"] = {"name": "tinyconv"}  # 2D points into a conv net
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(raw))
    code, _, err = run_cli(capsys, "train", path, "--out", tmp_path / "r", "--no-progress")
    assert code == 2 and "tinyconv takes images" in err, err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ configs and old runs
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_config_loads_and_builds_its_parts(path):
    from psm.runs.run_parts import Parts

    cfg = load_config(path)
    parts = Parts(cfg)
    assert parts.partition.num_blocks >= 1 and parts.partition.t0 > 0
    if cfg.data.name in ("ty", "hg"):
        net = parts.new_net()
        x = parts.dataset.sample(4, torch.Generator().manual_seed(0))
        assert net(x, torch.rand(4)).shape == x.shape


def scores_its_nll_again(run_dir: Path, tmp_path: Path, capsys) -> None:
    """``psm nll`` on a fixture run gives the NLL recorded in its ``nll.jsonl``."""
    want = json.loads((run_dir / "nll.jsonl").read_text().splitlines()[0])
    code, _, err = run_cli(capsys, "nll", run_dir, "--no-progress", "--json", tmp_path / "n.json")
    assert code == 0, err
    got = json.loads((tmp_path / "n.json").read_text())
    assert got["nll"] == pytest.approx(want["nll"], abs=1e-6) and got["n"] == want["n"]


def retrains_to_its_weights(fixture: str, blocks: int, tmp_path: Path, capsys) -> None:
    """Training ``fixture``'s config anew, one by one and stacked, gives the fixture's weights
    (``<fixture>/blocks`` and ``<fixture>_ensemble``) to float rounding."""
    for executor, ref in (("local", FIXTURES / fixture / "blocks"),
                          ("ensemble", FIXTURES / f"{fixture}_ensemble")):  # fmt: skip
        out_dir = tmp_path / executor
        code, _, err = run_cli(capsys, "train", FIXTURES / f"{fixture}.yaml", "--out", out_dir,
                               "--executor", executor, "--no-progress", "--no-plot")  # fmt: skip
        assert code == 0, err
        for b in range(blocks):
            a = load_file(out_dir / "blocks" / f"{b:04d}.safetensors")
            r = load_file(ref / f"{b:04d}.safetensors")
            assert set(a) == set(r)
            for k in r:
                torch.testing.assert_close(
                    a[k], r[k], rtol=0, atol=1e-6, msg=f"{executor} block {b} {k}"
                )


def test_a_run_made_by_psm_0_1_loads_evaluates_and_resumes(tmp_path, capsys):
    """tests/fixtures/run_v0_1 was written by psm 0.1.0 (t0 under process, every field dumped):
    it keeps its hash, gives the NLL psm 0.1 printed, and training the same config anew gives
    the same weights, in the loop and in the ensemble. Same to float rounding, not to the bit:
    the fixture was written on another CPU, whose float32 kernels round differently (measured
    on an AMD EPYC: NLL 1.7e-8 apart, weights 3e-8; a changed seed, data stream or step would
    move them by 1e-2 or more)."""
    old = tmp_path / "old"
    shutil.copytree(FIXTURES / "run_v0_1", old)
    run = Run.open(old)
    assert run.legacy_hash and run.hash == "dda5faa308f62672" and run.partition.t0 == 1e-4
    scores_its_nll_again(old, tmp_path, capsys)
    retrains_to_its_weights("run_v0_1", 2, tmp_path, capsys)

    fixture_cfg = FIXTURES / "run_v0_1.yaml"
    # the old run accepts its own config again (legacy hash) and extends its blocks
    code, _, err = run_cli(capsys, "train", fixture_cfg, "--out", old, "--steps", 40,
                           "--no-progress", "--no-plot")  # fmt: skip
    assert code == 0, err
    again = Run.open(old)
    assert again.hash == run.hash and [again.ledger.status(b).step for b in (0, 1)] == [40, 40]


def test_new_options_leave_existing_hashes_alone():
    """Fields at their default are left out of the hash: adding an option with a neutral
    default does not orphan existing runs."""
    base = validate_config(tiny_config())
    same = validate_config(tiny_config(net={"hidden": [16, 16], "dropout": 0.0}))
    other = validate_config(tiny_config(net={"hidden": [16, 16], "dropout": 0.1}))
    assert config_hash(base) == config_hash(same) != config_hash(other)
    moved = validate_config(tiny_config(process={"t0": 1e-3}))  # psm 0.1 layout
    assert moved.partition.t0 == 1e-3


def test_a_run_made_before_the_layer_packages_loads_evaluates_and_retrains(tmp_path, capsys):
    """tests/fixtures/run_974f4eb was written by psm at commit 974f4eb, before ``psm/`` became
    layer packages: a geometric partition, per-block step targets, a cosine schedule with
    warm-up, EMA, gradient clipping. It keeps its hash and its blocks' targets, scores the NLL
    it scored then, and training its config anew gives its weights, one by one and stacked (to
    float rounding: bit for bit on the CPU that wrote it, 1e-6 on another)."""
    old = tmp_path / "old"
    shutil.copytree(FIXTURES / "run_974f4eb", old)
    run = Run.open(old)
    assert not run.legacy_hash and run.hash == "b8b82159a6005a86" and run.num_blocks == 3
    assert [run.ledger.status(b).step for b in range(3)] == [40, 30, 20]
    assert run.ledger.not_done() == [] and run.ledger.not_done(invocation=True) == []
    scores_its_nll_again(old, tmp_path, capsys)
    retrains_to_its_weights("run_974f4eb", 3, tmp_path, capsys)
    fixture_cfg = FIXTURES / "run_974f4eb.yaml"
    # the old run takes its own config again: every block is done, nothing is retrained
    code, _, err = run_cli(capsys, "train", fixture_cfg, "--out", old, "--no-progress",
                           "--no-plot")  # fmt: skip
    assert code == 0, err
    assert [Run.open(old).ledger.status(b).step for b in range(3)] == [40, 30, 20]
