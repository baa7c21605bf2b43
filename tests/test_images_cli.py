"""psm nll / sample / plot on tiny trained digits runs (issue 8, items 3, 4 and 7): bits/dim
records, image grids, boundary strips, time and memory, one-line refusals."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import one_line_error, run_cli
from psm.core.ode import SolverSettings, integrate_blocks
from psm.core.sample import boundary_times, pick_times, sample, sample_path
from psm.runs.config import load_config, validate_config
from psm.runs.inference import evaluate_run, load_model
from psm.runs.run import Run
from psm.training.train import train_block, train_ensemble

TINY_UNET = {"name": "ddpm_unet", "base": 8, "mults": [1, 2], "res_blocks": 1, "groups": 4,
             "attention_levels": [], "dropout": 0.0}  # fmt: skip
TRAIN = {"steps": 10, "batch_size": 16, "log_every": 5, "checkpoint_every": 10}
EVAL = {"n_test": 8, "steps": 6, "test_seed": 5}


def digits_config(name: str, partition: dict, net: dict) -> dict:
    return {"name": name, "data": {"name": "digits"}, "partition": partition, "net": net,
            "train": TRAIN, "eval": EVAL}  # fmt: skip


@pytest.fixture(scope="module")
def tpsm(tmp_path_factory) -> Run:
    """TPSM on digits: 3 blocks of a tiny DDPM U-Net (10 steps each), t0 = 1e-3."""
    cfg = digits_config("digits_tiny", {"kind": "equal", "blocks": 3, "t0": 1e-3}, TINY_UNET)
    run = Run.create(validate_config(cfg), tmp_path_factory.mktemp("img") / "tpsm")
    assert [train_block(run, b).state for b in range(3)] == ["done"] * 3
    return run


@pytest.fixture(scope="module")
def dpsm(tmp_path_factory) -> Run:
    """DPSM on digits: 30 grid points of a tiny classic U-Net, stacked."""
    net = {"name": "classic_unet", "base": 4, "depth": 1, "groups": 2}
    cfg = digits_config("digits_dpsm", {"kind": "grid", "points": 30, "t0": 1e-3}, net)
    cfg["train"] = {**TRAIN, "steps": 5}
    run = Run.create(validate_config(cfg), tmp_path_factory.mktemp("img") / "dpsm")
    assert {o.state for o in train_ensemble(run)} == {"done"}
    return run


def records(run: Run) -> list[dict]:
    path = run.path / "nll.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


class FakeWriter:
    """Collects what psm writes to TensorBoard."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def tensorboard(monkeypatch) -> FakeWriter:
    writer = FakeWriter()
    monkeypatch.setattr("psm.runs.tensorboard.summary_writer", lambda path: writer)
    return writer


# --------------------------------------------------------------------------- nll
def test_nll_prints_bits_per_dim_beside_the_trivial_bound(tpsm, capsys, tensorboard):
    code, out, err = run_cli(capsys, "nll", tpsm.path, "--no-progress", "--threads", 1)
    assert code == 0, err
    warnings = [x for x in err.splitlines() if x.startswith("psm: warning:")]
    assert warnings == [
        "psm: warning: 64 dimensions > 16: Hutchinson trace (1 probe per solve, held fixed) "
        "instead of the exact one (64 backward passes per evaluation)"
    ]
    rec = records(tpsm)[-1]
    head, bound, detail = out.strip().splitlines()
    assert head.startswith(f"digits_tiny: {rec['bpd']:.4f} ± {rec['bpd_stderr']:.4f} bits/dim")
    assert "[psm convention: dequantized x = (k+u)/17" in head
    assert bound.startswith("  trivial bound log2 17 = 4.0875 bits/dim; NLL ")
    assert "8 test images of digits (seed 5), rk4 6 steps from t0 = 0.001" in detail
    assert "hutchinson trace (1 probe per solve)" in detail and "s per image" in detail
    # the record: bits/dim through the documented formula, every setting
    d = 64
    want = (rec["nll"] - d * math.log(2.0)) / (d * math.log(2)) + math.log2(17)
    assert rec["bpd"] == pytest.approx(want, abs=1e-9)
    assert rec["bpd_stderr"] == pytest.approx(rec["stderr"] / (d * math.log(2)), rel=1e-6)
    assert (rec["convention"], rec["levels"], rec["dims"], rec["dequantized"]) == (
        "psm", 17, 64, True,
    )  # fmt: skip
    assert rec["bpd_trivial"] == pytest.approx(math.log2(17))
    assert rec["log_scale_per_dim"] == pytest.approx(math.log(2.0))
    assert (rec["trace"], rec["probes"], rec["probe_redraw"]) == ("hutchinson", 1, "solve")
    assert rec["t0"] == rec["run_t0"] == 1e-3 and rec["steps"] == 6
    assert rec["seconds_per_point"] == pytest.approx(rec["seconds"] / 8, rel=0.01)
    assert rec["peak_memory_mb"] > 0 and rec["memory_kind"] == "process peak RSS"
    # the same number as the library call
    ev = evaluate_run(tpsm, progress=False)
    assert ev.bits.bpd == pytest.approx(rec["bpd"], abs=1e-9)
    # TensorBoard: eval/nll and eval/bpd at the trained step
    assert tensorboard.scalars == [("eval/nll", rec["nll"], 10), ("eval/bpd", rec["bpd"], 10)]
    assert tensorboard.closed


def test_nll_authors_convention_is_labelled_everywhere(tpsm, capsys, tensorboard):
    code, out, err = run_cli(
        capsys, "nll", tpsm.path, "--convention", "authors", "--steps", "2,2,2", "--probes", 3,
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "psm: warning" not in err  # the convention chose Hutchinson; nothing was replaced
    head, bound, detail = out.strip().splitlines()
    assert bound.startswith("  trivial bound log2 17 = 4.0875 bits/dim; NLL ")
    assert "[authors' convention: log2 17 - log p/(D ln 2) on k/16 minus the training mean" in head
    assert "not dequantized" in head and "(authors' convention)" in detail
    assert "hutchinson trace (3 probes redrawn every evaluation)" in detail
    assert "from t0 = 0.001" in detail and "rk4 steps 2,2,2" in detail
    rec = records(tpsm)[-1]
    assert rec["convention"] == "authors" and rec["convention_label"].startswith("authors'")
    assert (rec["dequantized"], rec["probe_redraw"], rec["probes"]) == (False, "evaluation", 3)
    assert rec["steps"] == [2, 2, 2] and rec["t0"] == 1e-3
    assert [tag for tag, _, _ in tensorboard.scalars] == ["eval/nll_authors", "eval/bpd_authors"]


def test_nll_exact_trace_on_images_only_when_forced(tpsm, capsys):
    before = records(tpsm)
    one_line_error(capsys, "nll", tpsm.path, "--trace", "exact", match="add --force")
    one_line_error(
        capsys, "nll", tpsm.path, "--trace", "exact", "--force", "--probes", 2,
        match="--probes applies to the Hutchinson trace",
    )  # fmt: skip
    one_line_error(capsys, "nll", tpsm.path, "--probes", 0, match="--probes must be >= 1")
    one_line_error(capsys, "nll", tpsm.path, "--threads", 0, match="--threads must be >= 1")
    one_line_error(
        capsys, "nll", tpsm.path, "--convention", "authors", "--solver", "dopri5",
        match="fixed-step solver",
    )  # fmt: skip
    assert records(tpsm) == before
    code, out, err = run_cli(
        capsys, "nll", tpsm.path, "--trace", "exact", "--force", "--n", 2, "--steps", 1,
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "psm: warning" not in err and "exact trace" in out
    assert records(tpsm)[-1]["trace"] == "exact" and records(tpsm)[-1]["probes"] is None


def test_authors_convention_on_2d_data_is_refused(make_run, capsys):
    run = make_run()
    one_line_error(capsys, "nll", run.path, "--convention", "authors", match="is for image data")
    assert not (run.path / "nll.jsonl").exists()


# --------------------------------------------------------------------------- sample
def test_sample_png_on_an_image_run_is_a_grid_of_the_samples(tpsm, capsys, tmp_path):
    args = ["sample", tpsm.path, "-n", 6, "--steps", 6, "--seed", 2, "--no-progress"]
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "s.npz")
    assert code == 0, err
    code, stdout, err = run_cli(capsys, *args, "--out", tmp_path / "g.png", "--nrow", 3)
    assert code == 0, err
    assert stdout.strip() == str(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.format == "PNG" and im.mode == "L"
        # 8x8 digits enlarged 6x to 48 px, 12 px of white between and around: 3 x 2 cells
        assert im.size == (12 + 3 * 60, 12 + 2 * 60)
        pixels = np.asarray(im)
    with np.load(tmp_path / "s.npz") as f:
        x = torch.from_numpy(f["samples"])
    assert x.shape == (6, 1, 8, 8)
    unit = tpsm.dataset.to_unit(x)
    for i in range(6):  # every cell is its sample mapped back to [0, 1], pixel for pixel
        r, c = divmod(i, 3)
        cell = pixels[12 + 60 * r : 12 + 60 * r + 48 : 6, 12 + 60 * c : 12 + 60 * c + 48 : 6]
        want = (unit[i, 0].numpy() * 255 + 0.5).astype(np.uint8)
        assert np.abs(cell.astype(int) - want.astype(int)).max() <= 1, i


def test_sample_reports_time_per_image_and_peak_memory(tpsm, capsys, tmp_path):
    out = tmp_path / "s.npz"
    code, _, err = run_cli(
        capsys, "sample", tpsm.path, "-n", 5, "--steps", 6, "--no-progress", "--out", out
    )
    assert code == 0, err
    line = next(x for x in err.splitlines() if x.startswith("5 samples"))
    assert "s per image" in line and "peak memory" in line and "process peak RSS" in line
    with np.load(out) as f:
        s = json.loads(str(f["settings"]))
    assert s["seconds"] > 0 and s["seconds_per_sample"] == pytest.approx(s["seconds"] / 5, 0.01)
    assert s["peak_memory_mb"] > 0 and s["memory_kind"] == "process peak RSS"


def test_samplers_run_batched_on_image_runs(tpsm, dpsm, capsys, tmp_path):
    cases = [
        (tpsm, ["--method", "sde", "--steps", 9, "--batch-size", 3]),  # reverse SDE
        (tpsm, ["--steps", "2,3,4"]),  # RK4 steps per block (the paper's 100,900 style)
        (dpsm, ["--solver", "euler", "--steps", 30]),  # DPSM: eq. 5, net i on step i
    ]
    for k, (run, extra) in enumerate(cases):
        out = tmp_path / f"{k}.npz"
        code, _, err = run_cli(
            capsys, "sample", run.path, "-n", 7, "--no-progress", "--out", out, *extra
        )
        assert code == 0, err
        with np.load(out) as f:
            x, s = f["samples"], json.loads(str(f["settings"]))
        assert x.shape == (7, 1, 8, 8) and np.isfinite(x).all(), extra
        assert s["n"] == 7
    assert s["solver"] == "euler" and s["steps"] == 30


def test_sample_refuses_grid_flags_that_do_not_apply(tpsm, capsys, tmp_path, make_run):
    one_line_error(
        capsys, "sample", tpsm.path, "--out", tmp_path / "s.npz", "--nrow", 4,
        match="--nrow applies to image grids",
    )  # fmt: skip
    one_line_error(
        capsys, "sample", tpsm.path, "--out", tmp_path / "s.png", "--nrow", 0,
        match="--nrow must be >= 1",
    )  # fmt: skip
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- sample_path
def test_sample_path_keeps_the_states_at_block_boundaries(tpsm):
    model = load_model(tpsm)
    times = boundary_times(model)
    assert times == [1.0, 2 / 3, 1 / 3, 1e-3]
    kw = dict(solver=SolverSettings("rk4", (3, 3, 3)))
    x, states = sample_path(
        model, 5, generator=torch.Generator().manual_seed(1), at=times, batch_size=2,
        progress=False, **kw,
    )  # fmt: skip
    assert states.shape == (4, 5, 1, 8, 8)
    # the same draws as sample(); the first state is the noise, the last the samples
    ref = sample(model, 5, generator=torch.Generator().manual_seed(1), batch_size=2,
                 progress=False, **kw)  # fmt: skip
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    torch.testing.assert_close(states[-1], x, rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    noise = torch.cat([torch.randn(2, 1, 8, 8, generator=g) for _ in range(2)])
    torch.testing.assert_close(states[0, :4], noise, rtol=0, atol=0)
    # a state in between is where the solve was: carried on through blocks 1 and 0 alone, it
    # gives the same samples
    segs = [seg for seg in model.segments() if seg.block < 2]
    (rest,) = integrate_blocks(
        lambda b, t, y: (model.field(y[0], t, b),), (states[1],), segs, direction="to_data",
        **kw,
    )  # fmt: skip
    torch.testing.assert_close(rest, x, rtol=0, atol=1e-5)  # batches of 2 vs one of 5
    with pytest.raises(ValueError, match="not block boundaries"):
        sample_path(model, 2, generator=torch.Generator(), at=[0.5], progress=False)


def test_pick_times_spreads_columns_over_many_blocks(dpsm):
    times = boundary_times(load_model(dpsm))
    assert len(times) == 31 and times[0] == 1.0 and times[-1] == 1e-3
    picked = pick_times(times, 11)
    assert len(picked) == 11 and picked[0] == 1.0 and picked[-1] == 1e-3
    assert picked == [times[i] for i in range(0, 31, 3)]
    assert pick_times(times[:4], 11) == times[:4]


# --------------------------------------------------------------------------- plot
def test_plot_on_an_image_run_writes_grid_strip_and_losses(dpsm, capsys, tmp_path):
    out = tmp_path / "figs"
    code, stdout, err = run_cli(
        capsys, "plot", dpsm.path, "--out", out, "--n", 10, "--rows", 3, "--no-progress"
    )
    assert code == 0, err
    names = ["loss_curves.png", "samples.png", "boundaries.png"]
    assert stdout.split() == [str(out / n) for n in names]
    for n in names:
        with Image.open(out / n) as im:
            im.verify()
            assert im.format == "PNG"
    with Image.open(out / "samples.png") as im:  # 10 samples: 4 x 3 cells of 60 px
        assert im.size == (12 + 4 * 60, 12 + 3 * 60)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_plot_refuses_flags_of_the_other_kind_of_run(tpsm, capsys, make_run):
    one_line_error(capsys, "plot", tpsm.path, "--grid", 5, match="--grid apply to 2D runs")
    one_line_error(capsys, "plot", tpsm.path, "--no-gif", match="--no-gif apply to 2D runs")
    one_line_error(capsys, "plot", tpsm.path, "--columns", 1, match="--columns must be >= 2")
    one_line_error(capsys, "plot", tpsm.path, "--rows", 0, match="--rows must be >= 1")
    run = make_run()
    one_line_error(capsys, "plot", run.path, "--rows", 3, match="--rows apply to image runs")
    assert not (tpsm.path / "plots").exists()


# --------------------------------------------------------------------------- shipped configs
ROOT = Path(__file__).parents[1]
IMAGE_CONFIGS = sorted((ROOT / "configs" / "images").glob("*.yaml"))
SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32),
          "celeba64": (3, 64, 64), "imagenet64": (3, 64, 64)}  # fmt: skip
METHODS = ("sa", "tpsm0", "tpsm1", "tpsm2", "dpsm")
TABLE6 = {"cifar10": (800_000, 400_000, 100_000, 50_000, 50_000),
          "celeba64": (800_000, 400_000, 100_000, 50_000, 100_000),
          "imagenet64": (2_000_000, 1_000_000, 250_000, 150_000, 250_000)}  # fmt: skip
BATCH = {"cifar10": 128, "celeba64": 32, "imagenet64": 32}


def test_image_configs_hold_the_paper_settings():
    names = {p.stem for p in IMAGE_CONFIGS}
    assert names == {f"{d}_{m}" for d in SHAPES for m in METHODS}
    for path in IMAGE_CONFIGS:
        cfg = load_config(path)
        data, method = path.stem.split("_")
        built = cfg.partition.build()
        assert cfg.name == path.stem and cfg.data.name == data and built.t0 == 1e-3
        blocks = {"sa": 1, "tpsm0": 2, "tpsm1": 10, "tpsm2": 100}
        if method == "dpsm":
            assert built.kind == "grid" and cfg.net.name == "classic_unet"
            assert (cfg.eval.solver, cfg.eval.steps) == ("euler", 5000)  # appendix H
        else:
            assert built.num_blocks == blocks[method] and cfg.net.name == "ddpm_unet"
            assert (cfg.eval.solver, cfg.eval.steps) == ("rk4", 1000)
        if method == "tpsm0":
            assert built.edges == (0.0, 0.1, 1.0)
        gpu = data in TABLE6
        if gpu:
            assert cfg.train.steps == TABLE6[data][METHODS.index(method)], path.stem
            assert cfg.train.batch_size == BATCH[data] * (4 if method == "dpsm" else 1)
            assert cfg.train.lr == (1e-3 if method == "dpsm" else 2e-4)
            recipe = (cfg.train.device, cfg.train.precision, cfg.train.ema)
            assert recipe == ("auto", "bf16", 0.9999)
            assert cfg.net.base == 64 and cfg.data.path == f"data/{data}"
            assert built.num_blocks == (1000 if method == "dpsm" else blocks[method])
        else:
            assert cfg.train.device == "cpu" and cfg.train.steps <= 4000
        # the net takes the data's shape; the documented parameter counts (docs/images.md)
        out, count = meta_net(cfg.net.model_dump_json(), SHAPES[data], built.time_conditioned)
        assert out == (2, *SHAPES[data]), path.stem
        if gpu:
            assert count == (31_037_763 if method == "dpsm" else 63_482_755), path.stem


@functools.cache
def meta_net(spec: str, shape: tuple[int, ...], time_conditioned: bool) -> tuple[tuple, int]:
    """Output shape and parameter count of a net spec, built and run on the meta device (no
    memory, little time); cached, since the configs of one data set share their nets."""
    from psm.nets import NETS

    with torch.device("meta"):
        net = NETS.validate(json.loads(spec)).build(shape, time_conditioned=time_conditioned)
        out = net(torch.empty(2, *shape), torch.empty(2))
    return tuple(out.shape), sum(p.numel() for p in net.parameters())


def test_the_digits_config_trains_scores_and_samples_from_a_fresh_clone(capsys, tmp_path):
    # issue 8's "done": psm train configs/images/digits_tpsm1.yaml, then psm nll prints bits/dim
    # and psm sample writes a grid (here with a few steps)
    run_dir = tmp_path / "digits_tpsm1"
    code, _, err = run_cli(
        capsys, "train", ROOT / "configs/images/digits_tpsm1.yaml", "--out", run_dir,
        "--steps", 2, "--workers", 1, "--set", "train.threads=1", "--no-progress", "--no-plot",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli(
        capsys, "nll", run_dir, "--n", 3, "--steps", 2, "--no-progress", "--threads", 1
    )
    assert code == 0, err
    assert "bits/dim [psm convention" in out and "trivial bound log2 17" in out
    code, _, err = run_cli(
        capsys, "sample", run_dir, "-n", 4, "--steps", 2, "--out", tmp_path / "g.png",
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (12 + 2 * 60, 12 + 2 * 60)


def test_the_mnist_config_trains_on_a_prepared_directory(capsys, tmp_path):
    from image_files import rng_images, write_mnist

    write_mnist(tmp_path / "raw", rng_images(40, (28, 28), 0), rng_images(6, (28, 28), 1), gz=True)
    prepared = tmp_path / "mnist"
    code, _, err = run_cli(
        capsys, "data", "prepare", "mnist", "--from", tmp_path / "raw", "--out", prepared,
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "train", ROOT / "configs/images/mnist_sa.yaml", "--out", run_dir,
        "--set", f"data.path={prepared}", "--steps", 2, "--no-progress", "--no-plot",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli(
        capsys, "nll", run_dir, "--n", 2, "--steps", 1, "--no-progress", "--threads", 1
    )
    assert code == 0, err
    assert "trivial bound log2 256 = 8.0000 bits/dim" in out and "(784 dims)" in out


def test_a_fourier_block_zero_trains_loads_and_scores_beside_a_plain_block(tmp_path):
    # issue 19: Fourier-feature inputs on the block nearest t0 only, on uncentred data (every
    # pixel's grey levels at the same x); the two blocks have different nets, so they train
    # one by one, and each block's file holds its own input width
    from safetensors import safe_open

    from psm.errors import PSMError
    from psm.runs.checkpoint import load_weights
    from psm.runs.config import config_hash

    cfg = digits_config("digits_ff", {"kind": "splits", "splits": [0, 0.1, 1], "t0": 1e-3},
                        TINY_UNET)  # fmt: skip
    cfg["data"] = {"name": "digits", "center": False}
    plain = validate_config(cfg)
    assert config_hash(plain) == config_hash(
        validate_config({**cfg, "net": {**TINY_UNET, "fourier_freqs": []}})
    )  # the default adds nothing to the hash
    cfg["blocks"] = [{"first": 0, "net": {"fourier_freqs": [4.25, 8.5]}}]
    run = Run.create(validate_config(cfg), tmp_path / "ff")
    assert config_hash(run.config) != config_hash(plain)
    assert [o.state for o in train_ensemble(run)] == ["done"] * 2
    widths = []
    for b in range(2):
        with safe_open(str(run.layout.weights(b)), framework="pt") as f:
            widths.append(f.get_tensor("conv_in.weight").shape[1])
    assert widths == [5, 1]
    with pytest.raises(PSMError):
        load_weights(run, 1, run.parts.new_net(0))  # a plain block's file for a Fourier net
    res = evaluate_run(run.path, n=4, solver=SolverSettings("rk4", 4))
    assert res.bits is not None and 0 < res.bits.bpd < 20
    assert torch.isfinite(res.result.values).all()
