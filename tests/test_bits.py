"""Bits/dim on image data against closed forms (issue 8, item 3).

An image-shaped Gaussian ``N(μ, S)`` in pixel space ``x ∈ [0, 1]^D`` is, in the model's space
``y = s (x - m)``, the Gaussian ``N(s (μ - m), s² S)``; under the VP process every ``p_t`` is
Gaussian in closed form and so is the exact network output (``GaussianMixture`` of
test_likelihood). A model made of those exact blocks must give, through the whole bits/dim
pipeline (test images drawn in the convention's data map, ODE from t0, the formula
``(NLL - D log s) / (D ln 2) + log2 L``), the bits/dim of the closed-form density at t0; and the
same pixel-space Gaussian seen through different rescalings must give the same bits/dim.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from psm.core.likelihood import EXACT_TRACE_MAX_DIM, auto_trace, divergence, log_likelihood
from psm.core.model import BlockModel
from psm.core.ode import SolverSettings
from psm.core.partition import equal, grid, splits
from psm.core.process import make_process
from psm.core.sample import sample
from psm.data.images import ImageArrays, ImageDataset
from psm.errors import PSMError
from psm.runs.config import validate_config
from psm.runs.inference import (
    AUTHORS_T0,
    EvalSettings,
    authors_solver,
    eval_settings,
    evaluate_model,
)
from psm.runs.run import Run
from test_likelihood import GaussianMixture

D64 = torch.float64
SHAPE = (1, 4, 4)  # D = 16: the exact trace stays cheap
D = math.prod(SHAPE)
LEVELS = 17
T0 = 1e-3  # the image configs' floor
VP = make_process("vp")
SOLVER = SolverSettings("rk4", (10, 60))  # per block: [t0, 0.1], [0.1, 1]; error < 3e-7 bits/dim


def arrays(seed: int = 0, n_train: int = 300, n_test: int = 40) -> ImageArrays:
    """Random 1x4x4 images with 17 levels (the content does not matter: the model is exact)."""
    rng = np.random.default_rng(seed)
    train = rng.integers(0, LEVELS, (n_train, *SHAPE), dtype=np.uint8)
    test = rng.integers(0, LEVELS, (n_test, *SHAPE), dtype=np.uint8)
    return ImageArrays("synthetic", LEVELS, train, test, train.mean(0, dtype=np.float64))


def pixel_gaussian(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and a full (non-diagonal) covariance ``[D, D]`` in pixel space [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    mean = 0.4 + 0.2 * torch.rand(D, generator=g, dtype=D64)
    a = torch.randn(D, D, generator=g, dtype=D64)
    cov = 0.03 * (a @ a.T) / D + 0.05 * torch.eye(D, dtype=D64)  # pixel std about 0.28
    return mean, cov


def model_space(ds: ImageDataset, mean, cov, dequantize: bool = True) -> GaussianMixture:
    """The pixel-space Gaussian as the model sees it: ``y = s (x - m)``."""
    shift = ds.shift(dequantize).reshape(-1)
    return GaussianMixture([1.0], [(ds.scale * (mean - shift)).tolist()], (ds.scale**2 * cov)[None])


def exact_image_model(dist: GaussianMixture, partition=None) -> BlockModel:
    """Image-shaped exact blocks: flatten, the exact ε of the Gaussian, reshape."""
    flat = dist.block(VP)

    def block(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flat(x.flatten(1), t).reshape(x.shape)

    partition = partition or splits([0, 0.1, 1], t0=T0)
    return BlockModel(VP, partition, [block] * partition.num_blocks, shape=SHAPE)


def exact_prior(dist: GaussianMixture):
    return lambda z: dist.log_prob(VP, z.flatten(1), 1.0)


def settings(convention="psm", trace="exact", probes=1, redraw="solve", solver=SOLVER, t0=T0):
    deq = convention == "psm"
    return EvalSettings(convention, solver, trace, probes, redraw, t0, deq)


def score(ds: ImageDataset, dist: GaussianMixture, st: EvalSettings, n: int = 40, **kw):
    return evaluate_model(
        exact_image_model(dist), ds, n=n, test_seed=3, settings=st, dtype=D64,
        prior_log_prob=exact_prior(dist), progress=False, **kw,
    )  # fmt: skip


def closed_form_bpd(ds: ImageDataset, dist: GaussianMixture, deq: bool, n: int = 40):
    """Per-image bits/dim of the closed-form density at t0, by the formula written out."""
    y = ds.test_set(n, 3, dequantize=deq).to(D64)
    nll = -dist.log_prob(VP, y.flatten(1), T0)
    return (nll - D * math.log(ds.scale)) / (D * math.log(2)) + math.log2(LEVELS)


# ---------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("scale,center", [(2.0, True), (1.0, False)])
def test_exact_gaussian_model_gives_the_closed_form_bits_per_dim(scale, center):
    ds = ImageDataset(arrays(), scale=scale, center=center)
    dist = model_space(ds, *pixel_gaussian())
    ev = score(ds, dist, settings())
    want = closed_form_bpd(ds, dist, deq=True)
    torch.testing.assert_close(ev.bits.values, want, rtol=0, atol=2e-6)
    assert ev.bits.bpd == pytest.approx(want.mean().item(), abs=2e-6)
    assert ev.bits.stderr == pytest.approx(want.std().item() / math.sqrt(40), rel=1e-3)
    assert (ev.bits.trivial, ev.bits.levels, ev.bits.dims) == (math.log2(LEVELS), LEVELS, D)
    assert ev.bits.log_scale_per_dim == math.log(scale) and ev.bits.convention == "psm"
    # the nats figure is the model-space NLL; bits/dim adds back log s per dimension
    nats = ev.result.values
    torch.testing.assert_close(ds.bits_per_dim(nats), ev.bits.values, rtol=0, atol=1e-12)
    # dequantized test images lie inside their cells: x = (k + u) / L
    x = ds.to_unit(ds.test_set(40, 3).double()) * LEVELS
    k = torch.from_numpy(ds.arrays.test[:40].astype(np.float64))
    assert ((x - k) >= 0).all() and ((x - k) < 1).all()


def test_the_same_model_through_two_rescalings_gives_the_same_bits_per_dim():
    mean, cov = pixel_gaussian()
    base = arrays()
    results, closed = {}, {}
    for scale, center in [(1.0, False), (2.0, True), (2.0, False), (1.0, True)]:
        ds = ImageDataset(base, scale=scale, center=center)
        dist = model_space(ds, mean, cov)
        results[scale, center] = score(ds, dist, settings()).bits.bpd
        closed[scale, center] = closed_form_bpd(ds, dist, deq=True).mean().item()
    ref = results[1.0, False]
    for key, bpd in results.items():
        # the closed forms differ only through the noise σ(t0)² = 5e-6 added in model space
        # (relatively larger at scale 1): 1.4e-5 bits/dim here; the pipeline follows them
        assert abs(closed[key] - closed[1.0, False]) < 1e-4
        assert bpd - ref == pytest.approx(closed[key] - closed[1.0, False], abs=1e-6), key
        assert abs(bpd - ref) < 1e-4


def test_authors_convention_is_their_formula_on_their_data_map():
    # k / (L - 1) minus the training mean, no dequantization, log2 L - log p / (D ln 2) with
    # psm's scale added back: the figure does not depend on data.scale either
    mean, cov = pixel_gaussian()
    got = {}
    for scale in (1.0, 2.0):
        ds = ImageDataset(arrays(), scale=scale, center=True)
        dist = model_space(ds, mean, cov, dequantize=False)
        ev = score(ds, dist, settings("authors"))
        y = ds.test_set(40, 3, dequantize=False).to(D64)
        x = ds.to_unit(y.clone(), dequantize=False)
        k = torch.from_numpy(ds.arrays.test[:40].astype(np.float64))
        torch.testing.assert_close(x * (LEVELS - 1), k, rtol=0, atol=1e-5)  # not dequantized
        log_p = dist.log_prob(VP, y.flatten(1), T0) + D * math.log(scale)  # density of x
        want = math.log2(LEVELS) - log_p / (D * math.log(2))
        torch.testing.assert_close(ev.bits.values, want, rtol=0, atol=2e-6)
        assert ev.bits.convention == "authors"
        got[scale] = ev.bits.bpd
    assert abs(got[1.0] - got[2.0]) < 1e-4


# ---------------------------------------------------------------------- Hutchinson
def test_hutchinson_with_many_probes_agrees_with_the_exact_trace():
    ds = ImageDataset(arrays(), scale=2.0)
    dist = model_space(ds, *pixel_gaussian())
    exact = score(ds, dist, settings()).bits.values
    err = {}
    for probes in (1, 32):
        ev = score(ds, dist, settings(trace="hutchinson", probes=probes), probe_seed=4)
        assert ev.result.probes == probes and ev.result.redraw == "solve"
        err[probes] = ev.bits.values - exact
    # unbiased: the mean error is within its standard error; 32 probes cut the spread by √32
    for e in err.values():
        assert abs(e.mean().item()) < 4 * e.std().item() / math.sqrt(len(e)) + 1e-9
    assert err[1].std() > 0.01  # a non-diagonal covariance: one probe is visibly noisy
    assert err[32].std() < err[1].std() / 3
    # probes redrawn at every evaluation (the authors' scripts): also unbiased, less noisy
    ev = score(ds, dist, settings(trace="hutchinson", redraw="evaluation"), probe_seed=4)
    e = ev.bits.values - exact
    assert ev.result.redraw == "evaluation"
    assert abs(e.mean().item()) < 4 * e.std().item() / math.sqrt(len(e)) + 1e-9
    assert e.std() < err[1].std()


def test_several_probes_are_the_mean_of_single_probes():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(D, D, generator=g, dtype=D64)
    x = torch.randn(5, *SHAPE, generator=g, dtype=D64)

    def f(z):
        return torch.tanh(z.flatten(1) @ a.T).reshape(z.shape)

    probes = torch.randint(0, 2, (3, 5, *SHAPE), generator=g).to(D64) * 2 - 1
    _, together = divergence(f, x, probes)
    alone = torch.stack([divergence(f, x, v)[1] for v in probes]).mean(0)
    torch.testing.assert_close(together, alone)


def test_redrawn_probes_need_a_fixed_step_solver():
    ds = ImageDataset(arrays(), scale=2.0)
    dist = model_space(ds, *pixel_gaussian())
    x = ds.test_set(2, 3).to(D64)
    with pytest.raises(ValueError, match="fixed-step"):
        log_likelihood(
            exact_image_model(dist), x, trace="hutchinson", redraw="evaluation",
            solver=SolverSettings("dopri5"),
        )  # fmt: skip


def test_the_exact_trace_is_the_default_up_to_16_dimensions():
    assert EXACT_TRACE_MAX_DIM == 16
    assert auto_trace(2) == auto_trace(16) == "exact"
    assert auto_trace(17) == auto_trace(64) == auto_trace(3072) == "hutchinson"


# ---------------------------------------------------------------------- settings of a run
def digits_run(tmp_path, partition, name="r") -> Run:
    raw = {
        "name": name,
        "data": {"name": "digits"},
        "partition": partition,
        "net": {"name": "ddpm_unet", "base": 8, "mults": [1, 2], "res_blocks": 1, "groups": 4,
                "attention_levels": []},
        "eval": {"steps": 300, "solver": "euler"},
    }  # fmt: skip
    if partition["kind"] == "grid":
        raw["net"] = {"name": "classic_unet", "base": 8, "depth": 1, "groups": 4}
    return Run.create(validate_config(raw), tmp_path / name)


def test_eval_settings_of_each_convention(tmp_path, make_run):
    run = digits_run(tmp_path, {"kind": "equal", "blocks": 3, "t0": 1e-4})
    psm = eval_settings(run)
    assert (psm.convention, psm.trace, psm.probes, psm.redraw) == ("psm", "hutchinson", 1, "solve")
    assert psm.solver == SolverSettings("euler", 300) and psm.t0 == 1e-4 and psm.dequantize
    authors = eval_settings(run, convention="authors")
    assert (authors.convention, authors.trace, authors.redraw) == (
        "authors", "hutchinson", "evaluation",
    )  # fmt: skip
    assert authors.solver == SolverSettings("rk4", (333, 333, 333))
    assert authors.t0 == AUTHORS_T0 == 1e-3 and authors.dequantize is False
    # given values win over the convention's
    mine = eval_settings(run, convention="authors", solver=SolverSettings("rk4", 10), probes=4)
    assert mine.solver == SolverSettings("rk4", 10) and mine.probes == 4
    # DPSM grids keep their own (Euler) solver; 1000 // K is at least one step
    dpsm = digits_run(tmp_path, {"kind": "grid", "points": 50}, "dpsm")
    assert eval_settings(dpsm, convention="authors").solver == SolverSettings("euler", 300)
    assert authors_solver(equal(2000, t0=1e-4), SOLVER).steps == (1,) * 2000
    assert authors_solver(grid(10), SOLVER) == SOLVER
    # 2D data have no levels: NLL in nats, exact trace, no convention
    toy = make_run()
    plain = eval_settings(toy)
    assert (plain.convention, plain.trace, plain.dequantize) == (None, "exact", None)
    with pytest.raises(PSMError, match="authors' convention is for image data"):
        eval_settings(toy, convention="authors")


def test_samplers_on_image_shapes_draw_the_exact_gaussian():
    # ODE (RK4, per-block steps), reverse SDE and DPSM Euler, batched on [B, 1, 4, 4]
    ds = ImageDataset(arrays(), scale=2.0)
    dist = model_space(ds, *pixel_gaussian())
    mean, cov = dist.covariance(VP, T0)
    n = 3000
    cases = {
        "ode": (exact_image_model(dist), "ode", SolverSettings("rk4", (10, 30))),
        "sde": (exact_image_model(dist), "sde", SolverSettings("rk4", 400)),
        "dpsm": (exact_image_model(dist, grid(200, t0=T0)), "ode", SolverSettings("euler", 200)),
    }
    for name, (model, method, solver) in cases.items():
        x = sample(
            model, n, generator=torch.Generator().manual_seed(7), method=method, solver=solver,
            batch_size=1000, dtype=D64, progress=False,
        )  # fmt: skip
        assert x.shape == (n, *SHAPE), name
        flat = x.flatten(1)
        se = (cov.diagonal() / n).sqrt()
        assert ((flat.mean(0) - mean).abs() < 5 * se).all(), name
        # covariance: within 15% on the diagonal (DPSM's piecewise-constant field is coarse)
        rel = (torch.cov(flat.T).diagonal() / cov.diagonal() - 1).abs()
        assert (rel < 0.15).all(), (name, rel.max())
