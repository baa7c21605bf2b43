"""Sampling through the blocks from exact scores: ODE (eqs. 3, 5) and reverse SDE (eq. 7)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from psm.core.ode import SolverSettings, probability_flow
from psm.core.partition import equal, grid
from psm.core.process import make_process
from psm.core.sample import prior_sample, sample, sample_ode, sample_sde
from test_likelihood import GAUSS, MIXTURE, UNEVEN7, exact_model

D64 = torch.float64
T0 = 1e-4  # the partitions' default time floor


def assert_moments(x: Tensor, mean: Tensor, cov: Tensor, z: float = 4.5) -> None:
    """Sample mean and covariance within ``z`` standard errors of the truth."""
    n = x.shape[0]
    se_mean = (cov.diagonal() / n).sqrt()
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    assert ((x.mean(0) - mean).abs() < z * se_mean).all(), (x.mean(0), mean)
    assert ((torch.cov(x.T) - cov).abs() < z * se_cov).all(), (torch.cov(x.T), cov)


def whitened_start(process, n: int, seed: int) -> Tensor:
    """Points whose empirical mean and covariance are exactly those of the Gaussian's p_1."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=D64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T
    mean, cov = GAUSS.covariance(process, 1.0)
    return mean + z @ torch.linalg.cholesky(cov).T


@pytest.mark.parametrize("name", ["vp", "ot"])
def test_ode_samples_of_the_exact_gaussian_have_its_moments(name):
    # the exact flow of a Gaussian is affine, so points with exactly p_1's empirical moments
    # must land with exactly p_t0's: no sampling error, only the solver's
    process = make_process(name)
    model = exact_model(GAUSS, process, UNEVEN7)
    x = sample_ode(model, whitened_start(process, 500, 0), solver=SolverSettings("rk4", 100))
    mean, cov = GAUSS.covariance(process, T0)
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["vp", "ot"])
def test_ode_samples_of_the_exact_mixture_have_its_moments(name):
    process = make_process(name)
    model = exact_model(MIXTURE, process, equal(1))
    x1 = MIXTURE.sample(8000, torch.Generator().manual_seed(1), process, 1.0)
    x = sample_ode(model, x1, solver=SolverSettings("rk4", 40))
    assert_moments(x, *MIXTURE.covariance(process, T0))


@pytest.mark.parametrize("name", ["vp", "ot"])
def test_sde_samples_of_the_exact_gaussian_have_its_moments(name):
    process = make_process(name)
    model = exact_model(GAUSS, process, UNEVEN7)
    gen = torch.Generator().manual_seed(2)
    x = sample_sde(model, whitened_start(process, 10000, 3), generator=gen, steps=500)
    assert_moments(x, *GAUSS.covariance(process, T0))


def test_ode_round_trip_returns_to_the_data():
    process = make_process("vp")
    model = exact_model(MIXTURE, process, UNEVEN7)
    x0 = MIXTURE.sample(16, torch.Generator().manual_seed(4))
    with torch.no_grad():
        x1 = probability_flow(model, x0, direction="to_noise", solver=SolverSettings("rk4", 400))
        back = probability_flow(model, x1, direction="to_data", solver=SolverSettings("rk4", 400))
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-8)


@pytest.mark.parametrize("grid_field", ["constant", "linear"])
def test_dpsm_euler_generation_is_eq5(grid_field):
    # eq. 5 by hand with the paper's VP formulas: x(t_{i-1}) = x(t_i) - ε f_i(x(t_i)),
    # f_i(x) = -½ b(t_i) (x + s_i(x)), net i on step i; the linear field agrees at cell tops
    process = make_process("vp")
    n = 20
    model = exact_model(GAUSS, process, grid(n), grid_field=grid_field)
    x1 = torch.randn(8, 2, generator=torch.Generator().manual_seed(5), dtype=D64)
    got = sample_ode(model, x1, solver=SolverSettings("euler", n))

    m, s, eye = GAUSS.means[0], GAUSS.covs[0], torch.eye(2, dtype=D64)
    x = x1.clone()
    for i in range(n, 0, -1):
        t_i, eps = i / n, i / n - max((i - 1) / n, 1e-4)
        big_b = 5 * t_i**2
        alpha, sigma2 = math.exp(-0.5 * big_b), -math.expm1(-big_b)
        score = -(x - alpha * m) @ torch.linalg.inv(alpha**2 * s + sigma2 * eye).T
        x = x - eps * (-0.5 * 10 * t_i) * (x + score)
    torch.testing.assert_close(got, x)


def test_sde_step_hook_and_seeding():
    process = make_process("vp")
    model = exact_model(GAUSS, process, UNEVEN7)
    x1 = torch.randn(4, 2, dtype=D64)
    times: list[float] = []
    a = sample_sde(
        model,
        x1,
        generator=torch.Generator().manual_seed(7),
        steps=50,
        on_step=lambda t, y: times.append(t),
    )
    b = sample_sde(model, x1, generator=torch.Generator().manual_seed(7), steps=50)
    torch.testing.assert_close(a, b)
    assert len(times) == 50 and times[-1] == T0
    assert times == sorted(times, reverse=True)


@pytest.mark.parametrize("method", ["ode", "sde"])
def test_sample_draws_n_points_reproducibly(method):
    process = make_process("vp")
    model = exact_model(GAUSS, process, UNEVEN7, shape=(2,))
    kw = dict(
        method=method, solver=SolverSettings("rk4", 20), batch_size=7, dtype=D64, progress=False
    )
    a = sample(model, 17, generator=torch.Generator().manual_seed(8), **kw)
    b = sample(model, 17, generator=torch.Generator().manual_seed(8), **kw)
    assert a.shape == (17, 2) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_sample_needs_a_shape():
    model = exact_model(GAUSS, make_process("vp"))
    with pytest.raises(ValueError, match="shape"):
        sample(model, 3, generator=torch.Generator(), progress=False)
    x = prior_sample(3, (2,), generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 2) and x.dtype == torch.float32
