"""Dequantization for bits/dim (issue 19, item 4): uniform (psm's default, unchanged) and i-DODE's
training-free truncated-normal dequantization as an evaluation option, labelled everywhere.

The math against closed forms: the truncated-normal draw stays in the bin and is the truncated
normal (scipy's), its density integrates to one; the variational bound
``E_q[log p(y) - log q(y)] <= log P(bin)`` holds for Gaussian models (1D quadrature, exact), is
an equality when the model's density is the noise's own normal, and then beats the uniform bound;
through the whole pipeline (exact Gaussian ODE blocks) every image's truncated-normal bits/dim is
then exactly ``-log2 P(bin)``. Uniform numbers are the old code path's, bit for bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from helpers import one_line_error, run_cli, tiny_config
from psm.commands.nll import DEQUANTIZATION_ALIASES, DEQUANTIZATION_CHOICES
from psm.core.likelihood import evaluate_nll
from psm.core.ode import SolverSettings
from psm.core.partition import splits
from psm.data.dequantize import (
    ALIASES,
    DEQUANTIZATIONS,
    TruncatedNormal,
    dequantization_name,
    noise_to_signal,
    truncated_standard_normal,
)
from psm.data.images import ImageArrays, ImageDataset
from psm.errors import PSMError
from psm.runs.config import validate_config
from psm.runs.inference import (
    EvalSettings,
    eval_settings,
    evaluate_model,
    evaluate_run,
    load_model,
    truncated_normal_test_set,
)
from psm.runs.nll_records import evaluation_key, find_record
from psm.runs.run import Run
from psm.training.train import train_ensemble
from test_bits import SHAPE, VP, exact_image_model, exact_prior
from test_likelihood import GaussianMixture

D64 = torch.float64
FAST = ["--no-progress", "--threads", "1"]
LEVELS = 17
D = math.prod(SHAPE)


# ---------------------------------------------------------------------- the draw and q
def test_names_and_cli_choices():
    assert DEQUANTIZATIONS == DEQUANTIZATION_CHOICES == ("uniform", "truncated-normal")
    assert DEQUANTIZATION_ALIASES.items() <= ALIASES.items()
    assert dequantization_name("tn") == dequantization_name("truncated-normal")
    assert dequantization_name("uniform") == "uniform"
    with pytest.raises(PSMError, match="unknown dequantization 'gauss'"):
        dequantization_name("gauss")
    with pytest.raises(PSMError, match="scale must be > 0"):
        TruncatedNormal(0.0, 0.1)


@pytest.mark.parametrize("tau", [0.05, 0.9, 2.63, 8.0, 26.3])
def test_truncated_normal_draw_stays_in_the_bin_and_is_scipys(tau):
    g = torch.Generator().manual_seed(1)
    eta = truncated_standard_normal((20000,), tau, g)
    assert eta.dtype == D64 and bool((eta.abs() <= tau).all())
    # the same seed, the same draw
    again = truncated_standard_normal((20000,), tau, torch.Generator().manual_seed(1))
    assert torch.equal(eta, again)
    ks = stats.kstest(eta.numpy(), stats.truncnorm(-tau, tau).cdf)
    assert ks.pvalue > 1e-3, ks
    # δ = r η lies within the bin's half width h
    q = TruncatedNormal(0.02, 0.02 * tau)
    delta = q.sample((50, 3, 2, 2), torch.Generator().manual_seed(2))
    assert delta.shape == (50, 3, 2, 2) and bool((delta.abs() <= q.half_width).all())


@pytest.mark.parametrize("scale,half", [(0.0224, 0.0588), (1.0, 0.3), (0.002, 0.0039), (0.5, 4.0)])
def test_truncated_normal_log_density_integrates_to_one_and_is_scipys(scale, half):
    q = TruncatedNormal(scale, half)
    ref = stats.truncnorm(-q.bound, q.bound, scale=scale)
    x = np.linspace(-half, half, 20001)
    logq = q.log_prob(torch.from_numpy(x)[:, None]).numpy()
    np.testing.assert_allclose(logq, ref.logpdf(x), rtol=0, atol=1e-9)
    assert integrate.simpson(np.exp(logq), x=x) == pytest.approx(1.0, abs=1e-8)
    assert q.log_mass == pytest.approx(math.log(stats.norm.cdf(q.bound) - stats.norm.cdf(-q.bound)))
    assert q.entropy(3) == pytest.approx(3 * ref.entropy(), rel=1e-9)
    # outside the bin q has no mass; the sum over a point's dimensions
    out = q.log_prob(torch.tensor([[0.0, 1.01 * half]], dtype=D64))
    assert out.item() == -math.inf
    two = q.log_prob(torch.tensor([[0.1 * half, -0.3 * half]], dtype=D64))
    assert two.item() == pytest.approx(ref.logpdf(0.1 * half) + ref.logpdf(-0.3 * half), abs=1e-9)


# ---------------------------------------------------------------------- the bound, 1D exact
def elbo(q_logpdf, lo: float, hi: float, log_p) -> float:
    """``E_q[log p - log q]`` over ``[lo, hi]`` by adaptive quadrature."""
    value, _ = integrate.quad(lambda y: math.exp(q_logpdf(y)) * (log_p(y) - q_logpdf(y)), lo, hi,
                              epsabs=1e-12, epsrel=1e-12, limit=200)  # fmt: skip
    return value


def bounds(mean: float, sd: float, centre: float, r: float, h: float) -> tuple[float, ...]:
    """(log P(bin), truncated-normal bound, uniform bound) of the model ``N(mean, sd²)`` on the
    bin ``[centre - h, centre + h]``; the truncated normal has scale ``r``."""
    q = TruncatedNormal(r, h)
    p = stats.norm(mean, sd)
    log_bin = math.log(p.cdf(centre + h) - p.cdf(centre - h))
    tn = elbo(lambda y: q.log_prob(torch.tensor([[y - centre]], dtype=D64)).item(),
              centre - h, centre + h, p.logpdf)  # fmt: skip
    uni = elbo(lambda y: -math.log(2 * h), centre - h, centre + h, p.logpdf)
    return log_bin, tn, uni


def test_both_bounds_lie_below_the_bin_probability_of_gaussian_models():
    centre, h, r = 0.3, 0.0588, 0.0224  # digits' half bin in model units, r = σ/α at t0 = 0.01
    for mean in (centre, centre + 0.5 * h, centre - 1.5 * h, centre + 0.1):
        for sd in (0.5 * r, r, 3 * r, 10 * h):
            log_bin, tn, uni = bounds(mean, sd, centre, r, h)
            assert tn <= log_bin + 1e-10 and uni <= log_bin + 1e-10, (mean, sd)


def test_truncated_normal_bound_is_exact_for_its_own_normal_and_beats_uniform():
    # the model's density is the noise's own normal around the bin centre (what a diffusion
    # model at t0 sees of data on the levels): log p - log q = log Z on the whole bin, so the
    # truncated-normal bound is log P(bin) = log Z exactly; the uniform bound is far below
    centre, h = 0.3, 0.0588
    for r in (0.0224, 0.05, 0.2):
        log_bin, tn, uni = bounds(centre, r, centre, r, h)
        tau = h / r
        assert tn == pytest.approx(log_bin, abs=1e-10)
        assert log_bin == pytest.approx(math.log(math.erf(tau / math.sqrt(2))), abs=1e-12)
        # uniform: log(2τ/√(2π)) - τ²/6 in closed form, below log Z (Jensen), and below tn
        assert uni == pytest.approx(math.log(2 * tau / math.sqrt(2 * math.pi)) - tau**2 / 6)
        assert uni < tn
    # τ = 2.63 (digits at t0 = 0.01): 0.58 bits per dimension apart
    _, tn, uni = bounds(centre, 0.0224, centre, 0.0224, h)
    assert (tn - uni) / math.log(2) > 0.5


def test_truncated_normal_bound_is_near_tight_for_noised_levels():
    # i-DODE's case: the data are the levels, the model their mixture blurred by r; the bin
    # holds almost only its own level's component, so the bound loses little, uniform a lot
    h, r = 0.0588, 0.0224
    centres = np.array([-2, -1, 0, 1, 2]) * 2 * h
    w = np.array([0.1, 0.2, 0.4, 0.2, 0.1])

    def log_p(y):
        return float(np.log((w * stats.norm.pdf(y, centres, r)).sum()))

    q = TruncatedNormal(r, h)
    p_bin = float((w * (stats.norm.cdf(h, centres, r) - stats.norm.cdf(-h, centres, r))).sum())
    tn = elbo(lambda y: q.log_prob(torch.tensor([[y]], dtype=D64)).item(), -h, h, log_p)
    uni = elbo(lambda y: -math.log(2 * h), -h, h, log_p)
    assert uni < tn <= math.log(p_bin)
    assert math.log(p_bin) - tn < 0.02 < math.log(p_bin) - uni


# ---------------------------------------------------------------------- through the ODE
T0_TN = 0.01  # σ/α = 0.0224 against the half bin 0.0588 (scale 2, 17 levels): τ = 2.63
# steps dense near t0, where p_t is sharp: error 5e-6 bits/dim (RK4 (10, 60) uniform: 1.4e-3)
TN_SOLVER = SolverSettings("rk4", (20, 60), grid="log")


def one_image_arrays(n_test: int = 4) -> tuple[ImageArrays, np.ndarray]:
    """Random 1x4x4 train images; a test set of one image repeated."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, LEVELS, (200, *SHAPE), dtype=np.uint8)
    k0 = rng.integers(0, LEVELS, SHAPE, dtype=np.uint8)
    test = np.repeat(k0[None], n_test, axis=0)
    return ImageArrays("synthetic", LEVELS, train, test, train.mean(0, dtype=np.float64)), k0


def test_exact_model_gives_minus_log2_of_the_bin_probability_for_every_draw():
    # Under VP the exact model's p_t0 is N(α μ, α² C + σ² I); with μ = c / α and
    # C = (r² - σ²) / α² I it is N(c, r² I), r = σ/α: the truncated-normal noise's own normal
    # around the test image's bin centre c. psm starts the ODE at y = c + δ, so every image,
    # whatever its draw, has bits/dim -log2 P(bin) = -log2 erf(τ/√2).
    arrays, k0 = one_image_arrays()
    ds = ImageDataset(arrays, scale=2.0, center=True)
    c = VP.schedule(torch.tensor(T0_TN, dtype=D64))
    alpha, sigma = float(c.alpha), float(c.sigma)
    r = sigma / alpha
    assert r == pytest.approx(noise_to_signal(VP, T0_TN), rel=1e-12)
    centre = ds.bin_centres(torch.from_numpy(k0)[None]).reshape(-1)
    var = (r * r - sigma * sigma) / alpha**2
    dist = GaussianMixture(
        [1.0], [(centre / alpha).tolist()], (var * torch.eye(D, dtype=D64))[None]
    )
    model = exact_image_model(dist, splits([0, 0.1, 1], t0=T0_TN))
    results = {}
    for deq in ("uniform", "truncated-normal"):
        st = EvalSettings("psm", TN_SOLVER, "exact", 1, "solve", T0_TN, True, deq)
        results[deq] = evaluate_model(
            model, ds, n=4, test_seed=3, settings=st, dtype=D64,
            prior_log_prob=exact_prior(dist), progress=False,
        )  # fmt: skip
    tau = ds.half_bin_width / r
    want = -math.log2(math.erf(tau / math.sqrt(2)))
    tn = results["truncated-normal"].bits
    assert tn.dequantization == "truncated-normal" and tn.noise_scale == pytest.approx(r)
    torch.testing.assert_close(tn.values, torch.full((4,), want, dtype=D64), rtol=0, atol=2e-5)
    # the points were dequantized inside the bin, one draw per seed
    y, log_q, q = truncated_normal_test_set(ds, VP, t0=T0_TN, n=4, seed=3)
    assert bool(((y.double() - centre.reshape(1, *SHAPE)).abs() <= q.half_width + 1e-6).all())
    torch.testing.assert_close(tn.log_q, log_q, rtol=0, atol=0)
    assert len({tuple(v.tolist()) for v in y.flatten(1)}) == 4  # four different draws
    # uniform dequantization of the same model: its usual formula, a far looser bound
    uni = results["uniform"].bits
    assert uni.dequantization == "uniform" and uni.log_q is None
    torch.testing.assert_close(uni.values, ds.bits_per_dim(results["uniform"].result.values))
    assert uni.bpd > tn.bpd + 0.3


# ---------------------------------------------------------------------- commands on digits
def trained(path: Path, **sections) -> Run:
    run = Run.create(validate_config(tiny_config(**sections)), path)
    assert {o.state for o in train_ensemble(run)} == {"done"}
    return run


def digits_run(path: Path, t0: float = 1e-3, seed: int = 0) -> Run:
    return trained(
        path, data={"name": "digits"}, partition={"kind": "equal", "blocks": 1, "t0": t0},
        train={"steps": 3, "batch_size": 8, "log_every": 5, "checkpoint_every": 10, "seed": seed},
        eval={"n_test": 6, "steps": 2, "test_seed": 5},
    )  # fmt: skip


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Run:
    """Digits (1x8x8, 17 levels) under a one-block [16, 16] MLP: an image run in a second."""
    return digits_run(tmp_path_factory.mktemp("dq") / "digits")


def records(run: Run) -> list[dict]:
    return [json.loads(x) for x in (run.path / "nll.jsonl").read_text().splitlines()]


def test_uniform_is_the_old_code_path_bit_for_bit(digits, capsys, tmp_path):
    # the library: the default, the explicit option and the primitives the old path used
    default = evaluate_run(digits, progress=False)
    explicit = evaluate_run(digits, progress=False, dequantization="uniform")
    ds = digits.dataset
    st = eval_settings(digits)
    x = ds.test_set(6, 5, dequantize=True)
    old = evaluate_nll(load_model(digits), x, solver=st.solver, trace=st.trace, seed=0)
    for ev in (default, explicit):
        assert torch.equal(ev.result.values, old.values)
        assert torch.equal(ev.bits.values, ds.bits_per_dim(old.values))
        assert ev.bits.dequantization == "uniform" and ev.settings.dequantization == "uniform"
    assert "(psm convention, uniform dequantization;" in str(default)
    # the command: the default and --dequantization uniform write the same numbers
    for extra in ([], ["--dequantization", "uniform"]):
        code, out, err = run_cli(capsys, "nll", digits.path, *FAST, *extra)
        assert code == 0, err
        assert "[psm convention: dequantized x = (k+u)/17, uniform dequantization" in out
    a, b = records(digits)[-2:]
    assert a["nll"] == b["nll"] == old.nll and a["bpd"] == b["bpd"] == default.bits.bpd
    assert a["dequantization"] == b["dequantization"] == "uniform"
    assert a["dequantization_scale"] is None and a["dequantization_log_q"] is None
    assert "uniform dequantization" in a["convention_label"]


def test_truncated_normal_is_labelled_in_every_output(digits, capsys, tmp_path, monkeypatch):
    scalars: list[str] = []

    class Writer:
        def add_scalar(self, tag, value, step):
            scalars.append(tag)

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr("psm.runs.tensorboard.summary_writer", lambda path: Writer())
    values = tmp_path / "tn.npy"
    code, out, err = run_cli(capsys, "nll", digits.path, *FAST, "--dequant", "tn",
                             "--values", values, "--json", tmp_path / "rec.json")  # fmt: skip
    assert code == 0, err
    rec = records(digits)[-1]
    assert rec == json.loads((tmp_path / "rec.json").read_text())
    head, bound, detail = out.strip().splitlines()
    assert "[psm convention, truncated-normal dequantization (i-DODE)" in head
    assert "r = σ/α at t0 = 0.00224" in head and "log q(δ)" in bound
    assert "(seed 5), truncated-normal dequantization, rk4 2 steps" in detail
    r = noise_to_signal(digits.process, 1e-3)
    assert (rec["dequantization"], rec["dequantized"], rec["convention"]) == (
        "truncated-normal", True, "psm",
    )  # fmt: skip
    assert rec["dequantization_scale"] == pytest.approx(r, rel=1e-12)
    assert rec["bpd"] == pytest.approx(
        (rec["nll"] + rec["dequantization_log_q"]) / (64 * math.log(2)), rel=1e-12
    )
    assert scalars == ["eval/nll_tn", "eval/bpd_tn"]
    # the library gives the same number; its record key tells it from the uniform one
    ev = evaluate_run(digits, progress=False, dequantization="truncated-normal")
    assert ev.bits.bpd == pytest.approx(rec["bpd"], rel=1e-12)
    key = evaluation_key(digits, ev.settings, n=6, test_seed=5, batch_size=1000, device="cpu",
                         dtype="float32")  # fmt: skip
    assert key["dequantization"] == "truncated-normal"
    assert find_record(digits.path, key)["bpd"] == rec["bpd"]
    # a record made before the field existed was uniform: it answers the uniform key only
    legacy = {k: v for k, v in dict(rec, **key, bpd=1.5).items() if k != "dequantization"}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "nll.jsonl").write_text(json.dumps(legacy) + "\n")
    assert find_record(tmp_path / "old", key) is None
    assert find_record(tmp_path / "old", dict(key, dequantization="uniform"))["bpd"] == 1.5
    # --values keeps the NLLs and, beside them, the dequantization and log q per point
    side = json.loads(Path(f"{values}.json").read_text())
    assert side["dequantization"] == "truncated-normal" and len(side["log_q"]) == 6
    assert np.mean(side["log_q"]) == pytest.approx(rec["dequantization_log_q"], rel=1e-12)
    assert np.load(values).mean() == pytest.approx(rec["nll"], rel=1e-12)
    # psm score on the run's own test images: psm nll's numbers, labelled in the .npz
    np.save(tmp_path / "k.npy", np.array(digits.dataset.arrays.test[:6]))
    code, text, err = run_cli(capsys, "score", digits.path, tmp_path / "k.npy", *FAST,
                              "--dequantization", "truncated-normal", "--out",
                              tmp_path / "s.npz")  # fmt: skip
    assert code == 0, err
    assert "truncated-normal dequantization (i-DODE)" in text
    assert "truncated-normal dequantization seed 5" in text
    with np.load(tmp_path / "s.npz") as z:
        np.testing.assert_allclose(-z["log_prob"], np.load(values), rtol=1e-12)
        np.testing.assert_allclose(z["log_q"], side["log_q"], rtol=1e-12)
        assert z["bits_per_dim"].mean() == pytest.approx(rec["bpd"], rel=1e-12)
        settings = json.loads(str(z["settings"]))
    assert settings["dequantization"] == "truncated-normal"
    assert "truncated-normal" in settings["bits_per_dim"]
    # the Python API
    import psm

    model = psm.load(digits.path)
    bits = model.bits_per_dim(dequantization="tn")
    assert bits.bpd == pytest.approx(rec["bpd"], rel=1e-12)
    assert bits.dequantization == "truncated-normal"
    k = torch.from_numpy(np.array(digits.dataset.arrays.test[:6]))
    exact = evaluate_run(digits, progress=False, trace="exact", dequantization="tn")
    per_image = model.bits_per_dim(k, seed=5, trace="exact", dequantization="truncated-normal")
    torch.testing.assert_close(per_image, exact.bits.values, rtol=1e-12, atol=0)
    with pytest.raises(PSMError, match="uint8 levels"):
        model.bits_per_dim(k.float() / 16, dequantization="tn")


def test_compare_refuses_values_of_different_dequantizations(digits, capsys, tmp_path):
    other = digits_run(tmp_path / "other", seed=1)
    for run, name in ((digits, "a"), (other, "b")):
        for deq in ("uniform", "tn"):
            code, _, err = run_cli(capsys, "nll", run.path, *FAST, "--dequantization", deq,
                                   "--values", tmp_path / f"{name}_{deq}.npy")  # fmt: skip
            assert code == 0, err
    tn_rec = records(other)[-1]
    runs = (digits.path, other.path)
    one_line_error(
        capsys, "compare", *runs, "--values", tmp_path / "a_tn.npy", tmp_path / "b_uniform.npy",
        match="b_uniform.npy was made under dequantization uniform",
    )  # fmt: skip
    one_line_error(
        capsys, "compare", *runs, "--values", tmp_path / "a_uniform.npy",
        tmp_path / "b_uniform.npy", "--dequant", "tn",
        match="made under dequantization uniform, not truncated-normal",
    )  # fmt: skip
    # the same dequantization: bits/dim from the values and their log q, as psm nll's
    code, out, err = run_cli(capsys, "compare", *runs, "--values", tmp_path / "a_tn.npy",
                             tmp_path / "b_tn.npy", "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["dequantization"] == "truncated-normal"
    assert "truncated-normal" in report["convention"]
    assert report["runs"][1]["value"] == pytest.approx(tn_rec["bpd"], rel=1e-12)
    # scored by compare itself: the same figures; uniform stays uniform
    code, out, err = run_cli(capsys, "compare", *runs, *FAST, "--dequant", "tn", "--json")
    assert code == 0, err
    scored = json.loads(out)
    assert scored["runs"][1]["value"] == pytest.approx(tn_rec["bpd"], rel=1e-12)
    code, out, err = run_cli(capsys, "compare", *runs, *FAST, "--json")
    assert code == 0, err
    assert json.loads(out)["dequantization"] == "uniform"
    # another t0: another noise, other test points
    late = digits_run(tmp_path / "late", t0=2e-3)
    one_line_error(capsys, "compare", digits.path, late.path, *FAST, "--dequant", "tn",
                   match="truncated-normal dequantization noise sigma/alpha at t0")  # fmt: skip


def test_truncated_normal_refusals(digits, capsys, make_run, tmp_path):
    one_line_error(capsys, "nll", digits.path, *FAST, "--dequant", "tn", "--convention",
                   "authors", match="applies to the psm convention")  # fmt: skip
    toy = trained(tmp_path / "toy", partition={"kind": "equal", "blocks": 1}, train={"steps": 5})
    one_line_error(capsys, "nll", toy.path, *FAST, "--dequantization", "truncated-normal",
                   match="truncated-normal dequantization is for image data")  # fmt: skip
    np.save(tmp_path / "p.npy", np.zeros((3, 2)))
    one_line_error(capsys, "score", toy.path, tmp_path / "p.npy", *FAST, "--dequant", "tn",
                   match="truncated-normal dequantization is for image data")  # fmt: skip
    with pytest.raises(PSMError, match="is for image data"):
        eval_settings(toy, dequantization="tn")
    with pytest.raises(PSMError, match="applies to the psm convention"):
        eval_settings(digits, convention="authors", dequantization="truncated-normal")
    # the authors' convention and 2D data record no dequantization
    assert eval_settings(digits, convention="authors").dequantization is None
    assert eval_settings(toy).dequantization is None
