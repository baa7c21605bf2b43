"""psm export: one file that loads without the run directory, scores the same, and refuses
every bad input (existing output, unfinished run, damaged or foreign file) in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import image_files as W
import psm
from helpers import one_line_error, run_cli, tiny_config
from psm.data.prepare import prepare
from psm.errors import PSMError
from psm.runs.config import validate_config
from psm.runs.inference import evaluate_run, open_model
from psm.runs.run import Run
from psm.training.train import train_block, train_ensemble

EVAL = {"n_test": 24, "steps": 8, "solver": "rk4", "test_seed": 7}


def trained_run(path: Path, **sections) -> Run:
    run = Run.create(validate_config(tiny_config(eval=EVAL, **sections)), path)
    assert [o.state for o in train_ensemble(run)] == ["done"] * run.num_blocks
    return run


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Run:
    """A tiny TY run with an EMA (3 blocks x 20 steps), every block done."""
    return trained_run(tmp_path_factory.mktemp("export") / "toy", train={"ema": 0.9})


def test_export_loads_without_the_run_and_scores_the_same(toy, tmp_path, capsys):
    run = Run.open(shutil.copytree(toy.path, tmp_path / "run"))
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1)) * 3
    before = psm.load(run).log_prob(x)
    code, out, err = run_cli(capsys, "nll", run.path, "--no-progress", "--json", tmp_path / "a")
    assert code == 0, err
    code, _, err = run_cli(capsys, "sample", run.path, "-n", 7, "--out", tmp_path / "a.npz",
                           "--no-progress")  # fmt: skip
    assert code == 0, err

    f = tmp_path / "model.safetensors"
    code, out, err = run_cli(capsys, "export", run.path, f)
    assert code == 0 and out.strip() == str(f), err
    # the blocks' EMA weights (the trainer's final weights), the config and the data digest
    state = load_file(run.layout.state(0))
    tensors = load_file(f)
    ema = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
    assert ema and all(torch.equal(tensors[f"block.0.{k}"], v) for k, v in ema.items())
    assert any(not torch.equal(state[f"net.{k}"], v) for k, v in ema.items())
    assert sorted(tensors) == sorted(
        f"block.{b}.{k}" for b in range(3) for k in load_file(run.layout.weights(b))
    )
    with safe_open(str(f), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["config_hash"] == run.hash and meta["weights"] == "ema"
    assert json.loads(meta["config"])["train"]["ema"] == 0.9
    assert json.loads(meta["data"])["shape"] == [2] and meta["psm_version"] == psm.__version__
    assert json.loads(meta["partition"])["blocks"] == 3

    shutil.rmtree(run.path)
    model = psm.load(f)
    assert torch.equal(model.log_prob(x), before)  # bit for bit
    assert model.source.is_export and model.source.hash == meta["config_hash"]
    # psm nll / sample on the file: the same numbers, the test set rebuilt from the config
    code, _, err = run_cli(capsys, "nll", f, "--no-progress", "--json", tmp_path / "b")
    assert code == 0 and "exported model" in err, err
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a", "b"))
    assert (a["nll"], a["stderr"], a["n"], a["trained_block_steps"]) == (
        b["nll"], b["stderr"], b["n"], b["trained_block_steps"]
    )  # fmt: skip
    assert b["run"] == str(f) and not (tmp_path / "nll.jsonl").exists()
    code, _, err = run_cli(capsys, "sample", f, "-n", 7, "--out", tmp_path / "b.npz",
                           "--no-progress")  # fmt: skip
    assert code == 0, err
    np.testing.assert_array_equal(
        np.load(tmp_path / "a.npz")["samples"], np.load(tmp_path / "b.npz")["samples"]
    )


def test_export_refuses_an_existing_output_and_an_unfinished_run(toy, make_run, tmp_path, capsys):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"keep me")
    one_line_error(capsys, "export", toy.path, f, match="exists")
    assert f.read_bytes() == b"keep me"
    one_line_error(capsys, "export", toy.path, tmp_path / "m.pt", match=".safetensors")
    one_line_error(capsys, "export", toy.path, tmp_path / "no" / "m.safetensors", match="folder")
    half = make_run()
    train_block(half, 0)
    one_line_error(capsys, "export", half.path, tmp_path / "h.safetensors", match="not fully")
    assert not (tmp_path / "h.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def exported(toy, tmp_path) -> tuple[Path, dict, dict]:
    f = psm.export(toy, tmp_path / "good.safetensors")
    with safe_open(str(f), framework="pt") as fh:
        meta = fh.metadata()
    return f, load_file(f), meta


def _nll_fails(capsys, path: Path, match: str) -> None:
    one_line_error(capsys, "nll", path, "--no-progress", match=match)
    with pytest.raises(PSMError) as e:
        psm.load(path)
    assert "\n" not in str(e.value) and match in str(e.value)


def test_damaged_or_foreign_files_are_refused_in_one_line(toy, exported, tmp_path, capsys):
    f, tensors, meta = exported
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(f.read_bytes()[:-100])
    _nll_fails(capsys, cut, "not a readable safetensors file")
    _nll_fails(capsys, toy.layout.weights(0), "not a psm exported model")  # a block's file
    (tmp_path / "text.safetensors").write_text("hello")
    _nll_fails(capsys, tmp_path / "text.safetensors", "not a readable safetensors")

    missing = dict(tensors)
    gone = sorted(k for k in missing if k.startswith("block.1."))[0]
    del missing[gone]
    save_file(missing, tmp_path / "missing.safetensors", metadata=meta)
    _nll_fails(capsys, tmp_path / "missing.safetensors", f"lacks 1 tensor(s) (first: {gone})")

    shaped = dict(tensors)
    key = sorted(k for k in shaped if k.startswith("block.2.") and k.endswith("weight"))[0]
    shaped[key] = torch.zeros(shaped[key].shape[0] + 1, *shaped[key].shape[1:])
    save_file(shaped, tmp_path / "shape.safetensors", metadata=meta)
    _nll_fails(capsys, tmp_path / "shape.safetensors", f"{key} has shape")

    extra = dict(tensors) | {"block.3.layers.0.weight": torch.zeros(2, 2)}
    save_file(extra, tmp_path / "extra.safetensors", metadata=meta)
    _nll_fails(capsys, tmp_path / "extra.safetensors", "unexpected tensor 'block.3.")

    edited = json.loads(meta["config"])
    edited["train"]["lr"] = 0.5
    save_file(
        tensors, tmp_path / "edited.safetensors", metadata=meta | {"config": json.dumps(edited)}
    )
    _nll_fails(capsys, tmp_path / "edited.safetensors", "does not match its config_hash")
    one_line_error(capsys, "nll", tmp_path / "nothing.safetensors", match="does not exist")


def test_a_points_export_keeps_its_centre_and_needs_its_file_for_nll(tmp_path, capsys):
    rng = np.random.default_rng(0)
    pts = tmp_path / "pts.npy"
    np.save(pts, rng.normal(size=(60, 3)) + np.array([100.0, -50.0, 7.0]))
    run = trained_run(
        tmp_path / "run", data={"name": "points", "path": str(pts)},
        partition={"kind": "equal", "blocks": 2}, train={"steps": 10},
    )  # fmt: skip
    raw = torch.from_numpy(np.load(pts)[:9])  # the file's own coordinates
    model = psm.load(run)
    lp = model.log_prob(raw)
    shift = run.dataset.shift
    ev = evaluate_run(run, progress=False)
    test_raw = run.dataset.test_set(100).double() + shift
    np.testing.assert_allclose(model.log_prob(test_raw), -ev.result.values, atol=1e-4)
    f = psm.export(run, tmp_path / "p.safetensors")
    pts.unlink()
    shutil.rmtree(run.path)
    exp = psm.load(f)
    assert torch.equal(exp.log_prob(raw), lp)
    torch.testing.assert_close(exp.dataset.shift, shift, rtol=0, atol=0)
    s = exp.sample(200, seed=0, steps=8)
    assert (s.mean(0).double() - shift).abs().max() < 10  # in the file's coordinates
    line = one_line_error(capsys, "nll", f, "--no-progress", match="psm score")
    assert "pts.npy" in line


def test_an_image_export_maps_images_as_in_training(tmp_path, capsys):
    src = tmp_path / "src"
    for i, im in enumerate(W.rng_images(12, (4, 4), 3)):
        W.write_png(src / f"{i:02d}.png", im)
    prepare("folder", src, tmp_path / "prep", progress=False, test_fraction=0.25)
    run = trained_run(
        tmp_path / "run", data={"name": "folder", "path": str(tmp_path / "prep")},
        partition={"kind": "equal", "blocks": 2}, train={"steps": 5, "batch_size": 8},
    )  # fmt: skip
    k = torch.from_numpy(np.load(tmp_path / "prep" / "test.npy"))  # uint8 [3, 1, 4, 4]
    ev = evaluate_run(run, trace="exact", progress=False)
    model = psm.load(run)
    lp = model.log_prob(k, seed=EVAL["test_seed"])  # dequantized as psm nll draws its test set
    d = 16
    log_det = d * math.log(run.dataset.scale)  # the map's log-Jacobian, added to log p
    torch.testing.assert_close(lp, log_det - ev.result.values, rtol=0, atol=1e-9)
    bpd = model.bits_per_dim(k, seed=EVAL["test_seed"], trace="exact")
    torch.testing.assert_close(bpd, ev.bits.values, rtol=0, atol=1e-9)
    torch.testing.assert_close(bpd, -lp / (d * math.log(2)) + 8, rtol=0, atol=1e-9)
    options = model.source.prepared_options  # how the files were prepared: kept in the export
    assert options["channels"] == 1
    f = psm.export(run, tmp_path / "img.safetensors")
    shutil.rmtree(tmp_path / "prep")
    shutil.rmtree(run.path)
    exp = psm.load(f)
    assert torch.equal(exp.log_prob(k, seed=EVAL["test_seed"]), lp)
    assert exp.source.prepared_options == options
    x = exp.sample(4, seed=0)
    assert x.shape == (4, 1, 4, 4) and float(x.min()) >= 0 and float(x.max()) <= 1
    line = one_line_error(capsys, "nll", f, "--no-progress", match="psm score")
    assert "not here" in line
    code, _, err = run_cli(capsys, "sample", f, "-n", 4, "--out", tmp_path / "g.png")
    assert code == 0 and (tmp_path / "g.png").exists(), err
    with pytest.raises(PSMError, match=r"expected points of shape \[N, 1, 4, 4\], got \[2, 16\]"):
        open_model(f).source.to_model(torch.zeros(2, 16))
