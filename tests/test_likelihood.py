"""Log-likelihood through the blocks against exact densities (paper eqs. 4 and 6).

For Gaussian-mixture data every ``p_t`` is a Gaussian mixture in closed form, and so are the
outputs a perfect network would give (``E[ε | x_t]`` for VP, ``E[α' x0 + σ' ε | x_t]`` for flow
matching). A model made of these exact blocks must reproduce ``log p_{t0}`` through the ODE.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from psm.core.likelihood import (
    divergence,
    evaluate_nll,
    log_likelihood,
    rademacher,
)
from psm.core.model import BlockModel
from psm.core.ode import SolverSettings
from psm.core.partition import equal, grid, splits
from psm.core.process import Process, make_process
from psm.runs.inference import evaluate_run, load_model
from psm.training.train import train_block

D64 = torch.float64
T0 = 1e-4  # the partitions' default time floor


class GaussianMixture:
    """``Σ_k w_k N(m_k, S_k)`` data, and its exact marginals under a path ``α_t x0 + σ_t ε``.

    Args:
        weights: ``[K]`` (normalised here).
        means: ``[K, D]``.
        covs: ``[K, D, D]``.
    """

    def __init__(self, weights, means, covs) -> None:
        w = torch.as_tensor(weights, dtype=D64)
        self.log_w = torch.log(w / w.sum())
        self.means = torch.as_tensor(means, dtype=D64)
        self.covs = torch.as_tensor(covs, dtype=D64)
        self.lam, self.q = torch.linalg.eigh(self.covs)  # S_k = Q_k diag(λ_k) Q_k^T
        self.dim = self.means.shape[1]

    def _parts(self, process: Process, x: Tensor, t) -> tuple:
        c = process.schedule(torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]))
        a, s = c.alpha[:, None, None], c.sigma[:, None, None]
        var = a * a * self.lam + s * s  # eigenvalues of Σ_k(t) = α² S_k + σ² I, [B, K, D]
        # y = Q^T Σ_k(t)⁻¹ (x - α m_k), in each component's eigenbasis
        y = torch.einsum("kji,bkj->bki", self.q, x[:, None, :] - a * self.means) / var
        log_n = -0.5 * (
            (y * y * var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi)
        )
        return c, self.log_w + log_n, y

    def log_prob(self, process: Process, x: Tensor, t) -> Tensor:
        """``log p_t(x)``, ``[B]``."""
        return torch.logsumexp(self._parts(process, x, t)[1], dim=1)

    def covariance(self, process: Process, t: float) -> tuple[Tensor, Tensor]:
        """Mean ``[D]`` and covariance ``[D, D]`` of ``p_t``."""
        c = process.schedule(torch.tensor(t, dtype=D64))
        w = self.log_w.exp()
        mu_k = c.alpha * self.means
        mean = w @ mu_k
        second = c.alpha**2 * self.covs + c.sigma**2 * torch.eye(self.dim, dtype=D64)
        cov = torch.einsum("k,kij->ij", w, second + mu_k[:, :, None] * mu_k[:, None, :])
        return mean, cov - mean[:, None] * mean[None, :]

    def block(self, process: Process):
        """The exact network output as a block ``(x [B, D], t [B]) -> [B, D]``."""

        def exact(x: Tensor, t: Tensor) -> Tensor:
            c, log_p, y = self._parts(process, x, t)
            r = torch.softmax(log_p, dim=1)[..., None]  # responsibilities
            a, s = c.alpha[:, None, None], c.sigma[:, None, None]
            # E[ε | x, k] = σ Σ⁻¹ (x - α m_k);  E[x0 | x, k] = m_k + α S_k Σ⁻¹ (x - α m_k)
            eps = torch.einsum("kij,bkj->bi", self.q, r * s * y)
            if process.prediction == "epsilon":
                return eps
            x0 = r[..., 0] @ self.means + torch.einsum("kij,bkj->bi", self.q, r * a * self.lam * y)
            return c.d_alpha[:, None] * x0 + c.d_sigma[:, None] * eps

        return exact

    def sample(self, n: int, generator: torch.Generator, process: Process | None = None, t=0.0):
        """``n`` draws from ``p_t`` (from the data when ``process`` is None), ``[n, D]``."""
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=D64)
        x0 = self.means[k] + torch.einsum("nij,nj->ni", self.q[k], self.lam[k].sqrt() * z)
        if process is None:
            return x0
        c = process.schedule(torch.tensor(t, dtype=D64))
        return c.alpha * x0 + c.sigma * torch.randn(n, self.dim, generator=generator, dtype=D64)


GAUSS = GaussianMixture([1.0], [[0.5, -1.0]], [[[1.0, 0.6], [0.6, 0.8]]])
MIXTURE = GaussianMixture(
    [0.3, 0.7],
    [[-1.5, 0.0], [1.5, 0.5]],
    [[[0.3, 0.1], [0.1, 0.2]], [[0.15, -0.05], [-0.05, 0.4]]],
)
UNEVEN7 = splits([0.0, 0.003, 0.02, 0.07, 0.15, 0.4, 0.75, 1.0])


def exact_model(dist: GaussianMixture, process: Process, partition=None, **kw) -> BlockModel:
    """A model whose every block is the exact network output."""
    partition = partition or equal(1)
    return BlockModel(process, partition, [dist.block(process)] * partition.num_blocks, **kw)


def exact_prior(dist: GaussianMixture, process: Process):
    """``log p_1`` exactly (VP with b_max = 10 leaves α_1² = e^-5 ≠ 0, so N(0, I) is not p_1)."""
    return lambda z: dist.log_prob(process, z, 1.0)


# ---------------------------------------------------------------------- traces
def test_exact_divergence_of_linear_and_nonlinear_maps():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=gen, dtype=D64)
    x = torch.randn(5, 3, generator=gen, dtype=D64)
    fx, div = divergence(lambda z: z @ a.T, x)
    torch.testing.assert_close(fx, x @ a.T)
    torch.testing.assert_close(div, torch.full((5,), a.trace().item(), dtype=D64))

    def g(z):
        return torch.tanh(z @ a.T) * z.sum(1, keepdim=True)

    _, div = divergence(g, x)
    ref = [torch.autograd.functional.jacobian(lambda v: g(v[None])[0], xi).trace() for xi in x]
    torch.testing.assert_close(div, torch.stack(ref))


def test_divergence_works_under_no_grad_and_keeps_no_graph():
    x = torch.randn(4, 2, dtype=D64)
    with torch.no_grad():
        fx, div = divergence(lambda z: z**3, x)
    assert not fx.requires_grad and not div.requires_grad
    torch.testing.assert_close(div, 3 * (x**2).sum(1))


@pytest.mark.parametrize("name", ["vp", "ot"])
def test_exact_trace_equals_analytic_divergence_of_the_gaussian_field(name):
    # p_t = N(α m, Σ_t): f = (α'/α) x - ½ g² s with s = -Σ_t⁻¹ (x - α m), so
    # tr ∂f/∂x = D α'/α + ½ g² tr Σ_t⁻¹
    process = make_process(name)
    model = exact_model(GAUSS, process)
    x = GAUSS.sample(6, torch.Generator().manual_seed(1))
    for t in (1e-3, 0.3, 0.97):
        _, div = divergence(lambda z, t=t: model.field(z, t, 0), x)
        c = process.schedule(torch.tensor(t, dtype=D64))
        sigma_t = c.alpha**2 * GAUSS.covs[0] + c.sigma**2 * torch.eye(2, dtype=D64)
        want = 2 * c.d_alpha / c.alpha + 0.5 * c.g2 * torch.linalg.inv(sigma_t).trace()
        torch.testing.assert_close(div, want.expand(6))


def test_hutchinson_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=gen, dtype=D64)
    x = torch.randn(4, 3, generator=gen, dtype=D64)

    def f(z):
        return torch.sin(z @ a.T) + z * z.sum(1, keepdim=True)

    _, exact = divergence(f, x)
    # over all 2^D sign patterns E[v v^T] = I exactly, so the mean is the trace
    patterns = [
        torch.tensor(p, dtype=D64).expand(4, 3) for p in itertools.product((-1, 1), repeat=3)
    ]
    mean = torch.stack([divergence(f, x, v)[1] for v in patterns]).mean(0)
    torch.testing.assert_close(mean, exact)
    # and random probes agree within their standard error
    draws = torch.stack(
        [divergence(f, x, rademacher(x.shape, generator=gen, dtype=D64))[1] for _ in range(400)]
    )
    se = draws.std(0) / math.sqrt(400)
    assert ((draws.mean(0) - exact).abs() < 5 * se + 1e-12).all()


def test_rademacher_probe_is_signs_and_seeded():
    v = rademacher((1000, 2), generator=torch.Generator().manual_seed(3))
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert abs(v.mean().item()) < 0.1
    torch.testing.assert_close(v, rademacher((1000, 2), generator=torch.Generator().manual_seed(3)))


def test_hutchinson_probe_is_held_fixed_through_the_solve():
    process = make_process("vp")
    model = exact_model(MIXTURE, process, UNEVEN7)
    x = MIXTURE.sample(8, torch.Generator().manual_seed(2))
    kw = dict(solver=SolverSettings("rk4", 40), prior_log_prob=exact_prior(MIXTURE, process))
    drawn = log_likelihood(
        model, x, trace="hutchinson", generator=torch.Generator().manual_seed(5), **kw
    )
    probe = rademacher(x.shape, generator=torch.Generator().manual_seed(5), dtype=D64)
    given = log_likelihood(model, x, trace="hutchinson", probe=probe, **kw)
    torch.testing.assert_close(drawn, given)
    # Δ is linear in v v^T along a trajectory that does not depend on v: averaging the four
    # fixed sign patterns of a 2D probe reproduces the exact-trace likelihood at any step count
    signs = [torch.tensor(p, dtype=D64).expand(8, 2) for p in itertools.product((-1, 1), repeat=2)]
    mean = torch.stack([log_likelihood(model, x, trace="hutchinson", probe=v, **kw) for v in signs])
    torch.testing.assert_close(mean.mean(0), log_likelihood(model, x, trace="exact", **kw))


# ---------------------------------------------------------------------- exact answers
@pytest.mark.parametrize("partition", [equal(1), UNEVEN7], ids=["K1", "uneven7"])
@pytest.mark.parametrize("dist", [GAUSS, MIXTURE], ids=["gaussian", "mixture"])
@pytest.mark.parametrize("name", ["vp", "ot"])
def test_ode_likelihood_of_the_exact_model_is_the_true_density(name, dist, partition):
    process = make_process(name)
    model = exact_model(dist, process, partition)
    x = dist.sample(12, torch.Generator().manual_seed(0))
    got = log_likelihood(
        model, x, solver=SolverSettings("rk4", 200), prior_log_prob=exact_prior(dist, process)
    )
    want = dist.log_prob(process, x, T0)
    assert (got - want).abs().max().item() < 1e-6  # RK4 in float64: ~1e-9 at 200 steps


def test_flow_matching_prior_is_the_standard_normal():
    # for OT, p_1 = N(σ_min m, I + σ_min² S): the default N(0, I) prior is exact to ~1e-4
    process = make_process("ot")
    model = exact_model(MIXTURE, process, UNEVEN7)
    x = MIXTURE.sample(12, torch.Generator().manual_seed(0))
    got = log_likelihood(model, x, solver=SolverSettings("dopri5", rtol=1e-7, atol=1e-7))
    assert (got - MIXTURE.log_prob(process, x, T0)).abs().max().item() < 1e-3


@pytest.mark.parametrize("name", ["vp", "ot"])
def test_dopri5_and_euler_converge_to_the_true_density(name):
    process = make_process(name)
    model = exact_model(MIXTURE, process, UNEVEN7)
    x = MIXTURE.sample(12, torch.Generator().manual_seed(4))
    prior = exact_prior(MIXTURE, process)
    want = MIXTURE.log_prob(process, x, T0)
    ada = log_likelihood(
        model, x, solver=SolverSettings("dopri5", rtol=1e-7, atol=1e-7), prior_log_prob=prior
    )
    assert (ada - want).abs().max().item() < 1e-4
    e1 = log_likelihood(model, x, solver=SolverSettings("euler", 100), prior_log_prob=prior) - want
    e2 = log_likelihood(model, x, solver=SolverSettings("euler", 200), prior_log_prob=prior) - want
    ratio = e1.abs().max() / e2.abs().max()
    assert 1.6 < ratio < 2.5  # first order: halving the step halves the error


# ---------------------------------------------------------------------- DPSM
def test_dpsm_constant_field_with_one_euler_step_per_cell_is_eq6():
    # eq. 6 by hand, with the paper's VP formulas (b(t) = 10 t) and the Gaussian's exact score:
    # x ← x + ε f_i(x), log p ← log p + ε tr ∂f_i/∂x, f_i(x) = -½ b(t_i) (x + s_i(x))
    process = make_process("vp")
    part = grid(25)
    model = exact_model(GAUSS, process, part, grid_field="constant")
    x = GAUSS.sample(10, torch.Generator().manual_seed(3))
    got = log_likelihood(model, x, solver=SolverSettings("euler", 25))

    m, s, eye = GAUSS.means[0], GAUSS.covs[0], torch.eye(2, dtype=D64)
    y, delta = x.clone(), torch.zeros(10, dtype=D64)
    for i in range(1, 26):
        t_i, t_prev = i / 25, max((i - 1) / 25, 1e-4)
        eps = t_i - t_prev
        big_b = 5 * t_i**2
        alpha, sigma2 = math.exp(-0.5 * big_b), -math.expm1(-big_b)
        prec = torch.linalg.inv(alpha**2 * s + sigma2 * eye)
        score = -(y - alpha * m) @ prec.T
        delta += eps * (-0.5 * 10 * t_i) * (2 - prec.trace())
        y = y + eps * (-0.5 * 10 * t_i) * (y + score)
    want = -0.5 * (y**2).sum(1) - math.log(2 * math.pi) + delta
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["vp", "ot"])
def test_dpsm_linear_field_beats_the_piecewise_constant_one(name):
    process = make_process(name)
    x = MIXTURE.sample(16, torch.Generator().manual_seed(5))
    want = MIXTURE.log_prob(process, x, T0)
    err = {}
    for mode in ("constant", "linear"):
        model = exact_model(MIXTURE, process, grid(100), grid_field=mode)
        got = log_likelihood(
            model,
            x,
            solver=SolverSettings("rk4", 200),
            prior_log_prob=exact_prior(MIXTURE, process),
        )
        err[mode] = (got - want).pow(2).mean().sqrt().item()
    assert err["linear"] < 0.5 * err["constant"]
    assert err["linear"] < 2e-3


def test_dopri5_on_the_kinked_dpsm_field_agrees_with_fine_rk4():
    """The linear DPSM field has a kink at every grid time. dopri5 stepping past a cell's end
    and interpolating back was off by 1e-3 nats here (default tolerance); landing on each end,
    it agrees with RK4 to 2e-5."""
    process = make_process("vp")
    model = exact_model(MIXTURE, process, grid(6), grid_field="linear")
    x = MIXTURE.sample(4, torch.Generator().manual_seed(9))
    ada = log_likelihood(model, x, solver=SolverSettings("dopri5"))
    rk4 = log_likelihood(model, x, solver=SolverSettings("rk4", 120))
    assert (ada - rk4).abs().max().item() < 2e-4


# ---------------------------------------------------------------------- evaluators
def test_evaluate_nll_mean_stderr_and_batching():
    process = make_process("vp")
    model = exact_model(MIXTURE, process, UNEVEN7)
    x = MIXTURE.sample(30, torch.Generator().manual_seed(6))
    kw = dict(solver=SolverSettings("rk4", 30), progress=False)
    res = evaluate_nll(model, x, batch_size=7, **kw)
    ref = -log_likelihood(model, x, solver=SolverSettings("rk4", 30))
    assert res.n == 30 and res.finite
    assert res.nll == pytest.approx(ref.mean().item(), abs=1e-12)
    assert res.stderr == pytest.approx(ref.std().item() / math.sqrt(30), abs=1e-12)
    torch.testing.assert_close(evaluate_nll(model, x, batch_size=100, **kw).values, res.values)
    h1 = evaluate_nll(model, x, batch_size=10, trace="hutchinson", seed=1, **kw)
    h2 = evaluate_nll(model, x, batch_size=10, trace="hutchinson", seed=1, **kw)
    assert h1.nll == h2.nll and h1.trace == "hutchinson"
    assert abs(h1.nll - res.nll) < 5 * h1.stderr


def test_evaluate_run_reports_the_entropy_floor(make_run):
    run = make_run(partition={"kind": "equal", "blocks": 2})
    for b in range(2):
        assert train_block(run, b).state == "done"
    ev = evaluate_run(run, n=40, solver=SolverSettings("rk4", 40), batch_size=16, progress=False)
    data = run.dataset
    assert ev.dataset == "ty" and ev.entropy == data.entropy and ev.grid_field is None
    assert ev.result.n == 40 and ev.result.finite
    model = load_model(run)
    x = data.test_set(40, run.config.eval.test_seed)
    ref = evaluate_nll(model, x, solver=SolverSettings("rk4", 40), progress=False)
    assert ev.result.nll == pytest.approx(ref.nll, abs=1e-6)
    # a fixed-step answer agrees with an independent adaptive integration (the check)
    ada = evaluate_nll(
        load_model(run, dtype=D64),
        x.double(),
        solver=SolverSettings("dopri5", rtol=1e-6, atol=1e-6),
        progress=False,
    )
    rk4 = evaluate_run(run, n=40, solver=SolverSettings("rk4", 400), progress=False)
    assert abs(rk4.result.nll - ada.nll) < 0.01
