"""The ``likelihood`` objective: ``D · loss`` is an unbiased estimate of the block's term of the
likelihood bound ``∫ ½ λ(t) E‖out − target‖² dt`` (``λ = g² C² / σ²``), checked against closed
forms and deterministic quadrature; the importance proposal (closed form for VP, tabulated
otherwise) lowers the variance; the draws are a pure function of the generator; and a config
naming it validates and trains."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import tiny_config
from psm.core.objective import (
    OBJECTIVES,
    LikelihoodObjective,
    LikelihoodSpec,
    Objective,
    stack_batches,
)
from psm.core.objective.likelihood import (
    TabulatedProposal,
    UniformProposal,
    VPProposal,
    bound_weight,
    likelihood_weight,
    make_proposal,
)
from psm.core.process import Process, make_process
from psm.errors import ConfigError
from psm.runs.config import config_hash, hashed_train, validate_config
from psm.training.train import BlockProblem, StackTrainer, train_block

VP = make_process("vp")  # b(t) = 10 t, ε-prediction
OT = make_process("ot")  # velocity prediction
MU = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)  # Gaussian data N(μ, s² I), D = 3
S = 0.7
D = MU.numel()


# ------------------------------------------------------------------ references (float64 numpy)
def vp_z(t_lo: float, t_hi: float, b_max: float = 10.0) -> float:
    """``Z = ∫ b/(1 − e^{−B}) dt = log expm1(B_hi) − log expm1(B_lo)``, ``B = ½ b_max t²``."""
    return math.log(math.expm1(0.5 * b_max * t_hi**2)) - math.log(math.expm1(0.5 * b_max * t_lo**2))


def coefficients(process: Process, t: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(α, σ, g²)`` of the process at float64 times, in numpy."""
    c = process.schedule(torch.from_numpy(t))
    return c.alpha.numpy(), c.sigma.numpy(), c.g2.numpy()


def bound_integrand(process: Process, t: np.ndarray, kappa: float) -> np.ndarray:
    """``½ g²/σ² E‖κ E[ε|x_t] − ε‖²`` for data ``N(μ, s² I)``: with ``v = α² s² + σ²``,
    ``E‖E[ε|x_t]‖² = D σ²/v`` and ``E‖κ E[ε|x] − ε‖² = D (1 − (2κ − κ²) σ²/v)``. In any
    prediction ``½ λ ‖out − target‖² = ½ g²/σ² ‖ε̂ − ε‖²``, so this is the integrand for all."""
    alpha, sigma, g2 = coefficients(process, t)
    v = alpha**2 * S**2 + sigma**2
    return 0.5 * g2 / sigma**2 * D * (1.0 - (2 * kappa - kappa**2) * sigma**2 / v)


def quadrature(process: Process, t_lo: float, t_hi: float, kappa: float) -> float:
    """``∫_{t_lo}^{t_hi} bound_integrand dt``: composite Simpson in ``log t`` (40001 points)."""
    u = np.linspace(math.log(t_lo), math.log(t_hi), 40001)
    t = np.exp(u)
    f = bound_integrand(process, t, kappa) * t
    h = u[1] - u[0]
    return float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))


def vp_closed_form(t_lo: float, t_hi: float, kappa: float) -> float:
    """The same integral for VP (b = 10 t) in closed form: ``∫ b/v dt = log(e^B + s² − 1)``."""
    big_b = [5.0 * t_lo**2, 5.0 * t_hi**2]
    log_v = [math.log(math.exp(b) + S**2 - 1.0) for b in big_b]
    return 0.5 * D * (vp_z(t_lo, t_hi) - (2 * kappa - kappa**2) * (log_v[1] - log_v[0]))


# ------------------------------------------------------------------ Monte Carlo of D · loss
def posterior_output(process: Process, x_t: torch.Tensor, t: torch.Tensor, kappa: float):
    """``κ E[ε | x_t]`` for data ``N(μ, s² I)`` in the process's own prediction, float64:
    ``E[ε | x_t] = σ (x_t − α μ) / (α² s² + σ²)``."""
    alpha, sigma = (c.double()[:, None] for c in process.schedule.alpha_sigma(t))
    eps = kappa * sigma * (x_t - alpha * MU) / (alpha**2 * S**2 + sigma**2)
    return process.from_epsilon(eps, x_t, t.double())


def contributions(obj: Objective, n: int, seed: int, kappa: float | None) -> torch.Tensor:
    """Per-sample ``D · w_b · mean_d (out − target)²`` over ``n`` draws (batches of 20000), for
    the net ``κ E[ε | x_t]`` (the zero net when κ is None), float64 throughout. The batch mean
    of these is ``D ·`` :meth:`Objective.loss` exactly."""
    g = torch.Generator().manual_seed(seed)
    out_all = []
    for _ in range(n // 20000):
        x0 = MU + S * torch.randn(20000, D, generator=g, dtype=torch.float64)
        batch = obj.draw(x0, g)
        target = batch.target.double()
        if kappa is None:
            out = torch.zeros_like(target)
        else:
            out = posterior_output(obj.process, batch.x_t, batch.t, kappa)
        per = batch.weight.double() * ((out - target) ** 2).sum(1)
        loss = obj.loss(out[None], target[None], batch.weight[None])
        torch.testing.assert_close(D * loss[0], per.mean(), rtol=1e-12, atol=0)
        out_all.append(per)
    return torch.cat(out_all)


def assert_unbiased(values: torch.Tensor, truth: float, sigmas: float = 4.0) -> None:
    mean, se = values.mean().item(), (values.std() / math.sqrt(values.numel())).item()
    assert abs(mean - truth) < sigmas * se, (mean, truth, se)
    assert se < 0.02 * abs(truth)  # the check has power


# ------------------------------------------------------------------ (a) the zero network
@pytest.mark.parametrize("sampling", ["importance", "uniform"])
@pytest.mark.parametrize("block", [(1e-4, 0.003), (0.1, 1.0)])
def test_zero_net_loss_is_half_d_z(sampling, block):
    """ε-prediction on VP, output 0: ``E‖0 − ε‖² = D`` so ``E[D · loss] = ½ D Z`` exactly."""
    obj = LikelihoodObjective(VP, *block, sampling)
    z = vp_z(*block)
    assert quadrature(VP, *block, kappa=0.0) == pytest.approx(0.5 * D * z, rel=1e-9)
    values = contributions(obj, 200_000, seed=1, kappa=None)
    assert_unbiased(values, 0.5 * D * z)
    if sampling == "importance":  # the weight is the constant ½ Z
        assert isinstance(obj.proposal, VPProposal)
        assert obj.proposal.total == pytest.approx(z, rel=1e-12)
        w = obj.times(1000, torch.Generator().manual_seed(0), torch.device("cpu"))[1]
        torch.testing.assert_close(w, torch.full((1000,), 0.5 * z), rtol=1e-7, atol=0)
        # the variance is that of ½ Z ‖ε‖² alone: Var = ¼ Z² · 2D
        assert values.var().item() == pytest.approx(0.25 * z**2 * 2 * D, rel=0.03)


# ------------------------------------------------------------------ (b) a non-trivial net
@pytest.mark.parametrize(
    ("process", "block", "sampling", "kind"),
    [
        (VP, (1e-3, 0.05), "importance", VPProposal),
        (VP, (0.1, 1.0), "uniform", None),
        (VP.with_prediction("x0"), (0.01, 0.3), "importance", VPProposal),
        (VP.with_prediction("v"), (1e-3, 0.2), "importance", TabulatedProposal),  # forced
        (VP.with_prediction("v"), (0.2, 1.0), "uniform", None),
        (OT, (1e-3, 0.5), "importance", TabulatedProposal),
        (OT, (0.3, 1.0), "importance", TabulatedProposal),
        (OT.with_prediction("epsilon"), (1e-4, 0.1), "importance", TabulatedProposal),
    ],
    ids=[
        "vp-eps-is",
        "vp-eps-unif",
        "vp-x0-is",
        "vp-v-table",
        "vp-v-unif",
        "ot-velocity-is",
        "ot-velocity-top",
        "ot-eps-is",
    ],
)
def test_loss_is_an_unbiased_estimate_of_the_bound(process, block, sampling, kind):
    """Net ``κ E[ε | x_t]`` (κ = ½) on Gaussian data, built in the block's prediction: the MC
    mean of ``D · loss`` is the quadrature of ``∫ ½ g²/σ² E‖ε̂ − ε‖² dt`` — the same number
    whatever the prediction, which checks the ``C(t)²`` in the weight."""
    kappa = 0.5
    obj = LikelihoodObjective(process, *block, sampling, tabulate=kind is TabulatedProposal)
    if kind is not None:
        assert type(obj.proposal) is kind
    truth = quadrature(process, *block, kappa)
    if process.schedule is VP.schedule:
        assert truth == pytest.approx(vp_closed_form(*block, kappa), rel=1e-9)
    assert_unbiased(contributions(obj, 200_000, seed=2, kappa=kappa), truth)


def test_the_weight_follows_the_prediction():
    """``λ = g² C²/σ²``: ``g²/σ²`` for ε, ``g² α²/σ⁴`` for x0, ``g² α²/(σ² (α²+σ²)²)`` for v,
    ``4/g²`` for the velocity."""
    t = torch.tensor([1e-4, 0.01, 0.3, 1.0], dtype=torch.float64)
    c = VP.schedule(t)
    a2, s2 = c.alpha**2, c.sigma**2
    want = {
        "epsilon": c.g2 / s2,
        "x0": c.g2 * a2 / s2**2,
        "v": c.g2 * a2 / (s2 * (a2 + s2) ** 2),
        "velocity": 4.0 / c.g2,
    }
    for pred, w in want.items():
        torch.testing.assert_close(
            likelihood_weight(VP.with_prediction(pred), t), w, rtol=1e-12, atol=0
        )
    assert likelihood_weight(VP, t).dtype == torch.float64


def test_importance_weights_are_half_z_c_squared():
    """Under ``q ∝ g²/σ² = p`` (``p/q = Z``), ``w = ½ λ/q = ½ Z C(t)²``: the constant ``½ Z``
    for ε, ``½ Z α²/σ²`` for x0."""
    z = vp_z(0.01, 0.3)
    for pred in ("epsilon", "x0", "v"):
        obj = LikelihoodObjective(VP.with_prediction(pred), 0.01, 0.3)
        t, w = obj.times(1000, torch.Generator().manual_seed(0), torch.device("cpu"))
        _, big_c = obj.process.epsilon_affine(t.double())
        torch.testing.assert_close(w.double(), 0.5 * z * big_c**2, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        bound_weight(VP.schedule, t.double()), likelihood_weight(VP, t.double())
    )


# ------------------------------------------------------------------ (c) less variance
def test_importance_sampling_lowers_the_variance_on_a_wide_block():
    """On [1e-4, 0.1] (λ ~ 2/t spans three decades) the same estimator has far less variance
    with ``q ∝ g²/σ² = λ`` than with uniform t (about 50×), and the same mean."""
    kappa, block = 0.5, (1e-4, 0.1)
    imp = contributions(LikelihoodObjective(VP, *block, "importance"), 200_000, 3, kappa)
    uni = contributions(LikelihoodObjective(VP, *block, "uniform"), 200_000, 3, kappa)
    assert imp.var().item() < 0.1 * uni.var().item()
    truth = vp_closed_form(*block, kappa)
    assert_unbiased(imp, truth)
    assert abs(uni.mean().item() - truth) < 5 * (uni.std() / math.sqrt(uni.numel())).item()


@pytest.mark.parametrize(
    ("process", "block", "ratio"),
    [
        (VP.with_prediction("x0"), (1e-4, 0.01), 0.2),
        (VP.with_prediction("x0"), (0.05, 0.5), 0.6),
        (VP.with_prediction("v"), (0.3, 1.0), 1.2),  # g²/σ² is nearly flat here
        (OT, (1e-4, 0.01), 0.2),
        (OT, (0.3, 1.0), 0.05),  # g² ~ 1/α as t → 1: the integrand peaks at t = 1
    ],
    ids=["vp-x0-first", "vp-x0-mid", "vp-v-last", "ot-first", "ot-last"],
)
def test_importance_sampling_follows_the_integrand_in_every_prediction(process, block, ratio):
    """``q ∝ g²/σ²`` follows ``½ g²/σ² E‖ε̂ − ε‖²``, the integrand in every parametrization, so
    it beats (or, where g²/σ² is flat, matches) uniform t whatever the net predicts. A
    proposal ``∝ λ = g² C²/σ²`` would not: it oversamples where ``C²`` is large (x0 near
    t = 0, the OT velocity away from t = 1), up to ~20-90× the uniform variance here."""
    imp = contributions(LikelihoodObjective(process, *block, "importance"), 40_000, 4, 0.5)
    uni = contributions(LikelihoodObjective(process, *block, "uniform"), 40_000, 4, 0.5)
    assert imp.var().item() < ratio * uni.var().item()
    assert_unbiased(imp, quadrature(process, *block, 0.5))


# ------------------------------------------------------------------ (d) closed form = tabulated
@pytest.mark.parametrize("block", [(1e-5, 0.003), (1e-4, 0.1), (0.1, 1.0)])
def test_the_closed_form_vp_proposal_agrees_with_the_tabulated_one(block):
    closed = make_proposal(VP.schedule, *block, "importance")
    table = make_proposal(VP.schedule, *block, "importance", tabulate=True)
    assert isinstance(closed, VPProposal) and isinstance(table, TabulatedProposal)
    assert closed.total == pytest.approx(vp_z(*block), rel=1e-12)
    assert table.total == pytest.approx(closed.total, rel=1e-5)
    t = torch.exp(torch.linspace(math.log(block[0]), math.log(block[1]), 1001, dtype=torch.float64))
    assert (closed.cdf(t) - table.cdf(t)).abs().max().item() < 1e-6
    assert closed.cdf(t[[0, -1]]).tolist() == pytest.approx([0.0, 1.0], abs=1e-14)
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tc, rc = closed.draw(u)
    tt, rt = table.draw(u)
    assert ((tc - tt).abs() / tc).max().item() < 1e-5  # the same quantiles
    torch.testing.assert_close(closed.cdf(tc), u, rtol=0, atol=1e-12)  # the exact inverse
    assert bool((rc == closed.total).all())
    assert ((rt / closed.total - 1).abs().max().item()) < 2e-3  # p/q ≈ Z within a cell
    # the KS distance of the tabulated draws from the closed-form CDF
    ks = (closed.cdf(tt.sort().values) - torch.arange(1, u.numel() + 1) / u.numel()).abs().max()
    assert ks.item() < 1.36 / math.sqrt(u.numel())


def test_a_coarse_table_is_still_unbiased():
    """``p/q`` for the q actually drawn from: three cells on [1e-4, 0.1] (a poor fit of p)
    still give ``E_q[p/q] = ∫ p = Z`` exactly, with more variance."""
    coarse = TabulatedProposal(lambda t: bound_weight(VP.schedule, t), 1e-4, 0.1, cells=3)
    u = torch.rand(400_000, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    t, ratio = coarse.draw(u)
    assert bool(((t >= 1e-4) & (t <= 0.1)).all())
    assert_unbiased(ratio, vp_z(1e-4, 0.1))
    assert ratio.std().item() > 0.05 * vp_z(1e-4, 0.1)


def test_vp_uses_the_closed_form_and_ot_the_table():
    for pred in ("epsilon", "x0", "v", "velocity"):
        vp = LikelihoodObjective(VP.with_prediction(pred), 1e-3, 0.5)
        ot = LikelihoodObjective(OT.with_prediction(pred), 1e-3, 0.5)
        assert isinstance(vp.proposal, VPProposal) and isinstance(ot.proposal, TabulatedProposal)
        assert isinstance(LikelihoodObjective(OT, 1e-3, 0.5, "uniform").proposal, UniformProposal)


# ------------------------------------------------------------------ (e) determinism
@pytest.mark.parametrize("process", [VP, OT], ids=["vp", "ot"])
@pytest.mark.parametrize("sampling", ["importance", "uniform"])
def test_the_same_seed_gives_the_same_batches(process, sampling):
    objs = [LikelihoodObjective(process, 1e-3, 0.3, sampling) for _ in range(2)]
    gens = [torch.Generator().manual_seed(7) for _ in range(2)]
    for _ in range(3):
        x0 = [torch.randn(64, 2, generator=g) for g in gens]
        a, b = (o.draw(x, g) for o, x, g in zip(objs, x0, gens))
        assert torch.equal(a.t, b.t) and torch.equal(a.weight, b.weight)
        assert torch.equal(a.x_t, b.x_t) and torch.equal(a.target, b.target)
        assert a.t.dtype == a.weight.dtype == torch.float32
        assert bool(((a.t >= 1e-3) & (a.t <= 0.3)).all())
    assert torch.equal(gens[0].get_state(), gens[1].get_state())
    other = objs[0].times(64, torch.Generator().manual_seed(8), torch.device("cpu"))[0]
    assert not torch.equal(other, a.t[:64])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_draws_on_the_generators_device():
    dev = torch.device("cuda")
    for process in (VP, OT):
        obj = LikelihoodObjective(process, 1e-4, 0.1)
        g = torch.Generator(device=dev).manual_seed(0)
        t, w = obj.times(4096, g, dev)
        assert t.device.type == w.device.type == "cuda"
        assert bool(((t >= 1e-4) & (t <= 0.1)).all() and torch.isfinite(w).all())
        g2 = torch.Generator(device=dev).manual_seed(0)
        assert torch.equal(obj.times(4096, g2, dev)[0], t)


# ------------------------------------------------------------------ (f) edges
def test_t_lo_at_zero_is_refused_in_one_line():
    for lo, hi in [(0.0, 0.1), (0.0, 0.0)]:
        with pytest.raises(ValueError, match="not integrable at t = 0") as e:
            LikelihoodObjective(VP, lo, hi)
        assert "\n" not in str(e.value)


def test_a_grid_point_has_its_time_and_no_weight():
    """A DPSM grid point has no integral: its own time, weight None, no random number drawn."""
    obj = LikelihoodSpec().build(VP, 0.25, 0.25)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    t, w = obj.times(16, g, torch.device("cpu"))
    assert w is None and obj.proposal is None
    assert torch.equal(t, torch.full((16,), 0.25)) and torch.equal(g.get_state(), state)


# ------------------------------------------------------------------ (g) the config and a run
def test_a_config_names_it_and_it_is_hashed_only_when_set():
    base = validate_config(tiny_config())
    cfg = validate_config(tiny_config(train={"objective": {"name": "likelihood"}}))
    uni = validate_config(
        tiny_config(train={"objective": {"name": "likelihood", "sampling": "uniform"}})
    )
    assert "likelihood" in OBJECTIVES.names() and OBJECTIVES.default == "mse"
    assert cfg.train.objective == LikelihoodSpec() and cfg.train.objective.sampling == "importance"
    assert hashed_train(cfg.train)["objective"] == {"name": "likelihood"}
    assert "objective" not in hashed_train(base.train)
    assert len({config_hash(base), config_hash(cfg), config_hash(uni)}) == 3
    with pytest.raises(ConfigError) as e:
        validate_config(tiny_config(train={"objective": {"name": "likelihood", "sampling": "x"}}))
    assert "\n" not in str(e.value) and "train.objective.sampling" in str(e.value)


def test_a_tiny_run_trains_with_it(make_run):
    """Block 0 ([t0, t1], where the weight matters most) trains through the normal trainer, and
    one StackTrainer step's losses are the objective's weighted losses of its own draws."""
    run = make_run(train={"log_every": 1, "objective": {"name": "likelihood"}})
    problem = BlockProblem.build(run, 0)
    obj = problem.objective
    assert isinstance(obj, LikelihoodObjective) and isinstance(obj.proposal, VPProposal)
    assert (obj.t_lo, obj.t_hi) == run.partition.train_range(0) and obj.t_lo > 0
    tr = StackTrainer(run, [0, 1, 2])
    refs = [p.new_generator() for p in tr.problems]
    batch = stack_batches([p.draw_batch(g) for p, g in zip(tr.problems, refs)])
    with torch.no_grad():
        out = tr.stack(batch.x_t, batch.t).float()
    per = ((out - batch.target) ** 2).mean(2)
    want = (batch.weight * per).mean(1)
    assert torch.equal(tr.train_step(), obj.loss(out, batch.target, batch.weight))
    torch.testing.assert_close(obj.loss(out, batch.target, batch.weight), want)
    assert train_block(run, 0).state == "done"
    lines = run.layout.metrics(0).read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)


def test_a_tiny_grid_and_flow_matching_run_trains_with_it(make_run):
    run = make_run(
        process={"name": "ot"},
        partition={"kind": "grid", "points": 3},
        train={"steps": 5, "objective": {"name": "likelihood"}},
    )
    assert BlockProblem.build(run, 1).objective.proposal is None  # a grid point
    assert train_block(run, 1).state == "done"
