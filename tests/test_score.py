"""psm score (issue 20, item 1): log p of the user's own points and images, mapped exactly as
in training; the run's own test split gives psm nll's numbers; every bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import one_line_error, run_cli, tiny_config
from image_files import write_png
from psm.data.images import load_prepared
from psm.runs.config import validate_config
from psm.runs.run import Run
from psm.runs.scoring import _resize, read_images
from psm.training.train import train_ensemble

FAST = ["--no-progress", "--threads", "1"]
TINY_MLP = {"hidden": [16, 16]}
IMAGE_TRAIN = {"steps": 3, "batch_size": 8, "log_every": 5, "checkpoint_every": 10}
IMAGE_EVAL = {"n_test": 6, "steps": 2, "test_seed": 5}


def trained(path: Path, **sections) -> Run:
    run = Run.create(validate_config(tiny_config(**sections)), path)
    assert {o.state for o in train_ensemble(run)} == {"done"}
    return run


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Run:
    """TY, 2 blocks of a [16, 16] MLP; 20 test points, RK4 with 4 steps."""
    return trained(
        tmp_path_factory.mktemp("score") / "toy",
        partition={"kind": "equal", "blocks": 2},
        train={"steps": 10},
        eval={"n_test": 20, "steps": 4},
    )


@pytest.fixture(scope="module")
def points(tmp_path_factory) -> tuple[Run, np.ndarray]:
    """A points run on a file far from the origin (the training mean is subtracted)."""
    root = tmp_path_factory.mktemp("points")
    rng = np.random.default_rng(0)
    data = rng.normal([5.0, -3.0], [1.0, 0.5], size=(60, 2))
    np.save(root / "data.npy", data)
    run = trained(
        root / "run",
        data={"name": "points", "path": str(root / "data.npy"), "test_fraction": 0.2},
        partition={"kind": "equal", "blocks": 1},
        train={"steps": 10},
        eval={"n_test": 100, "steps": 4},
    )
    return run, data


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Run:
    """Digits (1x8x8, 17 levels) under a one-block [16, 16] MLP: an image run in a second."""
    return trained(
        tmp_path_factory.mktemp("digits") / "run",
        data={"name": "digits"},
        partition={"kind": "equal", "blocks": 1, "t0": 1e-3},
        train=IMAGE_TRAIN,
        eval=IMAGE_EVAL,
    )


def last_record(run: Run) -> dict:
    return json.loads((run.path / "nll.jsonl").read_text().splitlines()[-1])


def nll_values(capsys, run: Run, out: Path, *extra) -> np.ndarray:
    code, _, err = run_cli(capsys, "nll", run.path, *FAST, "--values", out, *extra)
    assert code == 0, err
    return np.load(out)


# --------------------------------------------------------------------------- the evidence
def test_own_test_split_gives_psm_nll(capsys, toy, tmp_path):
    """The run's test points written to a file score to psm nll's per-point values (exact
    trace, same batches): log p = -NLL point by point, and the same mean."""
    x = toy.dataset.test_set(20, toy.config.eval.test_seed).numpy()
    np.save(tmp_path / "test.npy", x)
    code, out, err = run_cli(capsys, "score", toy.path, tmp_path / "test.npy", *FAST,
                             "--out", tmp_path / "logp.npy")  # fmt: skip
    assert code == 0, err
    logp = np.load(tmp_path / "logp.npy")
    assert logp.dtype == np.float64 and logp.shape == (20,)
    values = nll_values(capsys, toy, tmp_path / "v.npy")
    np.testing.assert_allclose(-logp, values, rtol=1e-12, atol=0)
    rec = last_record(toy)
    assert rec["trace"] == "exact"
    assert -logp.mean() == pytest.approx(rec["nll"], rel=1e-12)
    assert f"log p {-rec['nll']:.4f} ± {rec['stderr']:.4f} nats per point" in out


def test_csv_and_npy_agree_and_solver_flags_apply(capsys, toy, tmp_path):
    x = toy.dataset.test_set(5, 1).numpy().astype(np.float64)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "x.csv").write_text("x,y\n" + "\n".join(f"{float(a)!r},{float(b)!r}" for a, b in x))
    logps = []
    for name, steps in (("x.npy", "4"), ("x.csv", "4"), ("x.npy", "2")):
        out = tmp_path / f"{name}.{steps}.npy"
        code, _, err = run_cli(capsys, "score", toy.path, tmp_path / name, *FAST,
                               "--steps", steps, "--out", out)  # fmt: skip
        assert code == 0, err
        logps.append(np.load(out))
    np.testing.assert_array_equal(logps[0], logps[1])
    assert not np.allclose(logps[0], logps[2])  # --steps reached the solver


def test_points_run_subtracts_the_training_mean(capsys, points, tmp_path):
    """A points run is scored in the file's own units: its raw test points give psm nll's
    values (the run subtracts its training mean, as training did); a point far outside the
    data is scored, with a much lower log p, not refused."""
    run, _ = points
    ds = run.dataset
    raw = ds.test_set(100).double().numpy() + ds.shift.numpy()
    far = raw.mean(axis=0) + 40.0
    np.save(tmp_path / "raw.npy", np.vstack([raw, far]))
    code, _, err = run_cli(capsys, "score", run.path, tmp_path / "raw.npy", *FAST,
                           "--out", tmp_path / "lp.npz")  # fmt: skip
    assert code == 0, err
    with np.load(tmp_path / "lp.npz") as z:
        logp = z["log_prob"]
        assert "bits_per_dim" not in z.files
        settings = json.loads(str(z["settings"]))
    assert settings["n"] == len(raw) + 1 and settings["bits_per_dim"] is None
    values = nll_values(capsys, run, tmp_path / "v.npy")
    np.testing.assert_allclose(-logp[:-1], values, rtol=1e-5)
    assert np.isfinite(logp[-1]) and logp[-1] < logp[:-1].min() - 10


def test_digits_layouts_match_psm_nll_bits_per_dim(capsys, digits, tmp_path):
    """Raw uint8 test images in each accepted layout give psm nll's values and bits/dim
    (psm convention, dequantized with the run's eval.test_seed)."""
    k = np.array(digits.dataset.arrays.test[:6])  # [6, 1, 8, 8], levels 0..16
    values = nll_values(capsys, digits, tmp_path / "v.npy")
    rec = last_record(digits)
    layouts = {"nchw": k, "nhw": k[:, 0], "nhwc": k.transpose(0, 2, 3, 1)}
    for name, arr in layouts.items():
        np.save(tmp_path / f"{name}.npy", arr)
        out = tmp_path / f"{name}.npz"
        code, text, err = run_cli(capsys, "score", digits.path, tmp_path / f"{name}.npy",
                                  *FAST, "--out", out)  # fmt: skip
        assert code == 0, err
        with np.load(out) as z:
            np.testing.assert_allclose(-z["log_prob"], values, rtol=1e-12)
            assert z["bits_per_dim"].mean() == pytest.approx(rec["bpd"], rel=1e-12)
            assert "psm convention" in json.loads(str(z["settings"]))["bits_per_dim"]
        assert f"{rec['bpd']:.4f} ± {rec['bpd_stderr']:.4f} bits/dim [psm convention" in text


def test_dequantization_seed_changes_scores(capsys, digits, tmp_path):
    np.save(tmp_path / "k.npy", np.array(digits.dataset.arrays.test[:3]))
    got = []
    for seed in ("5", "6"):
        out = tmp_path / f"s{seed}.npy"
        code, _, err = run_cli(capsys, "score", digits.path, tmp_path / "k.npy", *FAST,
                               "--seed", seed, "--out", out)  # fmt: skip
        assert code == 0, err
        got.append(np.load(out))
    assert not np.allclose(got[0], got[1])


def test_prepared_directory_and_image_folder(capsys, digits, tmp_path):
    """A prepared digits directory's test split is the bundled one: psm nll over the whole
    test set gives the same mean; PNG files of the test images give the .npy's values."""
    code, _, err = run_cli(capsys, "data", "prepare", "digits", "--out", tmp_path / "prep",
                           "--no-progress")  # fmt: skip
    assert code == 0, err
    n_test = digits.dataset.n_test
    code, _, err = run_cli(capsys, "score", digits.path, tmp_path / "prep", *FAST,
                           "--out", tmp_path / "prep.npy")  # fmt: skip
    assert code == 0, err
    logp = np.load(tmp_path / "prep.npy")
    assert logp.shape == (n_test,)
    values = nll_values(capsys, digits, tmp_path / "v.npy", "--n", str(n_test))
    np.testing.assert_allclose(-logp, values, rtol=1e-12)
    code, _, err = run_cli(capsys, "score", digits.path, tmp_path / "prep", *FAST,
                           "--split", "train")  # fmt: skip
    assert code == 0 and f"{digits.dataset.n_train} image(s)" in capsys.readouterr().out + _

    k = np.array(digits.dataset.arrays.test[:4])
    for i, img in enumerate(k):
        write_png(tmp_path / "pngs" / f"{i}.png", img[0])
    np.save(tmp_path / "k.npy", k)
    got = {}
    for name in ("pngs", "k.npy"):
        out = tmp_path / f"{name}.out.npy"
        code, _, err = run_cli(capsys, "score", digits.path, tmp_path / name, *FAST, "--out", out)
        assert code == 0, err
        got[name] = np.load(out)
    np.testing.assert_array_equal(got["pngs"], got["k.npy"])


def test_folder_run_resizes_as_its_data_were_prepared(capsys, tmp_path):
    """Images of a run whose folder was prepared with --size 8 are resized the same way:
    the folder read for scoring holds exactly the prepared train + test images."""
    rng = np.random.default_rng(1)
    for i in range(8):
        h, w = (12, 10) if i % 2 else (9, 14)  # mixed sizes: resized in training too
        write_png(tmp_path / "imgs" / f"{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    code, _, err = run_cli(capsys, "data", "prepare", "folder", "--from", tmp_path / "imgs",
                           "--out", tmp_path / "prep", "--size", "8", "--no-progress")  # fmt: skip
    assert code == 0, err
    run = trained(tmp_path / "run", data={"name": "folder", "path": str(tmp_path / "prep")},
                  partition={"kind": "equal", "blocks": 1, "t0": 1e-3}, train=IMAGE_TRAIN,
                  eval=IMAGE_EVAL)  # fmt: skip
    assert _resize(run) == 8
    raw = read_images(tmp_path / "imgs", shape=run.shape, levels=256, resize=_resize(run))
    prepared = load_prepared(tmp_path / "prep")
    both = np.concatenate([prepared.train, prepared.test])
    key = lambda a: sorted(x.tobytes() for x in a)  # noqa: E731
    assert raw.shape == (8, 3, 8, 8) and key(raw) == key(both)
    code, text, err = run_cli(capsys, "score", run.path, tmp_path / "imgs", *FAST)
    assert code == 0 and "8 image(s)" in text, err


# --------------------------------------------------------------------------- bad inputs
def test_bad_point_inputs(capsys, toy, tmp_path):
    def refused(name: str, match: str, *extra) -> None:
        one_line_error(capsys, "score", toy.path, tmp_path / name, *FAST, *extra, match=match)

    np.save(tmp_path / "three.npy", np.zeros((4, 3)))
    refused("three.npy", "points of 3 dimension(s), this run's have 2")
    np.save(tmp_path / "flat.npy", np.zeros(4))
    refused("flat.npy", "expected an array [N, d]")
    np.save(tmp_path / "nan.npy", np.array([[0.0, 1.0], [np.nan, 0.0]]))
    refused("nan.npy", "NaN or infinite")
    (tmp_path / "inf.csv").write_text("0,1\n1,inf\n")
    refused("inf.csv", "NaN or infinite")
    (tmp_path / "empty.npy").write_bytes(b"")
    refused("empty.npy", "empty file")
    np.save(tmp_path / "none.npy", np.zeros((0, 2)))
    refused("none.npy", "no points")
    (tmp_path / "header.csv").write_text("x,y\n")
    refused("header.csv", "no data rows")
    np.save(tmp_path / "obj.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    refused("obj.npy", "object (pickled) array")
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((3, 2)))
    (tmp_path / "cut.npy").write_bytes(good.read_bytes()[:-10])
    refused("cut.npy", "not a readable .npy file")
    (tmp_path / "x.txt").write_text("1,2\n")
    refused("x.txt", "a point run scores a .npy or .csv")
    (tmp_path / "dir").mkdir()
    refused("dir", "a point run scores a .npy or .csv")
    refused("missing.npy", "no such file or folder")
    (tmp_path / "taken.npy").write_bytes(b"keep")
    refused("good.npy", "exists", "--out", tmp_path / "taken.npy")
    assert (tmp_path / "taken.npy").read_bytes() == b"keep"
    refused("good.npy", "use FILE.npy", "--out", tmp_path / "lp.txt")
    refused("good.npy", "does not exist", "--out", tmp_path / "no" / "lp.npy")
    refused("good.npy", "prepared directory", "--split", "train")
    refused("good.npy", "--probes applies to the Hutchinson trace", "--probes", "2")
    assert not list(tmp_path.glob("*.npz")) and not (tmp_path / "lp.txt").exists()


def test_bad_image_inputs(capsys, digits, tmp_path):
    def refused(name: str, match: str) -> None:
        one_line_error(capsys, "score", digits.path, tmp_path / name, *FAST, match=match)

    k = np.array(digits.dataset.arrays.test[:3])
    np.save(tmp_path / "float.npy", k.astype(np.float32))
    refused("float.npy", "float32 images; expected uint8 levels")
    high = k.copy()
    high[1, 0, 3, 3] = 17
    np.save(tmp_path / "high.npy", high)
    refused("high.npy", "image 1 has level 17, outside 0..16")
    np.save(tmp_path / "shape.npy", np.zeros((3, 7, 7), dtype=np.uint8))
    refused("shape.npy", "images of shape [3, 7, 7] do not fit this run's 1x8x8 images")
    np.save(tmp_path / "rgb.npy", np.zeros((3, 3, 8, 8), dtype=np.uint8))
    refused("rgb.npy", "do not fit")
    np.save(tmp_path / "none.npy", np.zeros((0, 8, 8), dtype=np.uint8))
    refused("none.npy", "no images")
    (tmp_path / "zero.npy").write_bytes(b"")
    refused("zero.npy", "empty file")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    refused("junk.npy", "not a .npy file")
    write_png(tmp_path / "mixed" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    write_png(tmp_path / "mixed" / "b.png", np.zeros((9, 8), dtype=np.uint8))
    refused("mixed", "images of mixed sizes")
    write_png(tmp_path / "big" / "a.png", np.zeros((9, 9), dtype=np.uint8))
    refused("big", "images are 9x9, this run's are 8x8")
    write_png(tmp_path / "bright" / "a.png", np.full((8, 8), 200, dtype=np.uint8))
    refused("bright", "level 200, outside 0..16")
    (tmp_path / "emptydir").mkdir()
    refused("emptydir", "no .png/.jpg/.jpeg files")
    (tmp_path / "bad" / "a.png").parent.mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"\x89PNG broken")
    refused("bad", "not a readable image")
    (tmp_path / "k.csv").write_text("1,2\n")
    refused("k.csv", "an image run scores a uint8 .npy")


def test_exported_model_scores_without_run_or_data(capsys, tmp_path):
    """A points run exported with psm export scores the same inputs to the same values after
    its run directory and its data file are deleted (the export carries the training mean)."""
    import shutil

    rng = np.random.default_rng(2)
    np.save(tmp_path / "data.npy", rng.normal([3.0, 1.0], 0.5, size=(40, 2)))
    run = trained(
        tmp_path / "run",
        data={"name": "points", "path": str(tmp_path / "data.npy")},
        partition={"kind": "equal", "blocks": 1},
        eval={"steps": 3},
    )
    np.save(tmp_path / "mine.npy", rng.normal([3.0, 1.0], 2.0, size=(7, 2)))
    code, _, err = run_cli(capsys, "score", run.path, tmp_path / "mine.npy", *FAST,
                           "--out", tmp_path / "from_run.npy")  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(capsys, "export", run.path, tmp_path / "model.safetensors")
    assert code == 0, err
    shutil.rmtree(run.path)
    (tmp_path / "data.npy").unlink()
    model, mine = tmp_path / "model.safetensors", tmp_path / "mine.npy"
    code, _, err = run_cli(capsys, "score", model, mine, *FAST, "--out", tmp_path / "exp.npy")
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "exp.npy"),
                                  np.load(tmp_path / "from_run.npy"))  # fmt: skip
    one_line_error(capsys, "compare", tmp_path / "model.safetensors",
                   tmp_path / "model.safetensors", *FAST, match="psm score")  # fmt: skip
