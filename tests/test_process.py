"""Forward processes against closed forms and finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from psm.core.process import OTSchedule, VPSchedule, make_process

T = torch.linspace(1e-3, 0.999, 41, dtype=torch.float64)


def test_vp_coefficients_match_paper_closed_form():
    s = VPSchedule(0.0, 10.0)
    c = s(T)
    big_b = 5.0 * T**2  # ∫₀ᵗ 10 s ds
    torch.testing.assert_close(c.alpha, torch.exp(-0.5 * big_b))
    torch.testing.assert_close(c.sigma, torch.sqrt(1 - torch.exp(-big_b)))
    torch.testing.assert_close(c.alpha**2 + c.sigma**2, torch.ones_like(T))
    torch.testing.assert_close(c.g2, 10.0 * T)


def test_vp_sigma_accurate_near_t0_in_float32():
    t = torch.tensor([1e-4], dtype=torch.float32)
    exact = math.sqrt(-math.expm1(-5.0 * 1e-8))
    assert VPSchedule()(t).sigma.item() == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("schedule", [VPSchedule(0.1, 20.0), VPSchedule(), OTSchedule(1e-3)])
def test_derivatives_and_diffusion_by_finite_differences(schedule):
    h = 1e-6
    c, cp, cm = schedule(T), schedule(T + h), schedule(T - h)
    torch.testing.assert_close(c.d_alpha, (cp.alpha - cm.alpha) / (2 * h), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(c.d_sigma, (cp.sigma - cm.sigma) / (2 * h), rtol=1e-5, atol=1e-7)
    # marginal variance of the forward SDE dx = (α'/α) x dt + g dW: d(σ²)/dt = 2(α'/α)σ² + g²
    dvar = (cp.sigma**2 - cm.sigma**2) / (2 * h)
    torch.testing.assert_close(
        dvar, 2 * c.d_alpha / c.alpha * c.sigma**2 + c.g2, rtol=1e-5, atol=1e-7
    )


def test_vp_field_is_paper_eq30():
    p = make_process("vp")
    x = torch.randn(8, 2, dtype=torch.float64)
    eps = torch.randn(8, 2, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64) * 0.9 + 0.05
    b = 10 * t[:, None]
    sigma = torch.sqrt(-torch.expm1(-5 * t**2))[:, None]
    score = -eps / sigma
    torch.testing.assert_close(p.score(eps, x, t), score)
    torch.testing.assert_close(p.velocity(eps, x, t), -0.5 * b * (x + score))
    drift, g = p.reverse_sde(eps, x, t)
    torch.testing.assert_close(drift, -b * (0.5 * x + score))  # eq. 7
    torch.testing.assert_close(g, torch.sqrt(10 * t))


@pytest.mark.parametrize("name", ["vp", "ot"])
def test_training_target_is_conditional_velocity(name):
    """For velocity prediction the target is d x_t / dt along the conditional path."""
    p = make_process(name, prediction="velocity")
    x0 = torch.randn(16, 2, dtype=torch.float64)
    eps = torch.randn(16, 2, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * 0.9 + 0.05
    h = 1e-6
    xp, _ = p.training_pair(x0, t + h, eps)
    xm, _ = p.training_pair(x0, t - h, eps)
    _, target = p.training_pair(x0, t, eps)
    torch.testing.assert_close(target, (xp - xm) / (2 * h), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["vp", "ot"])
def test_epsilon_and_velocity_parametrisations_agree(name):
    """The conditional ε and the conditional velocity give the same field and score."""
    pe = make_process(name, prediction="epsilon")
    pv = make_process(name, prediction="velocity")
    x0 = torch.randn(16, 2, dtype=torch.float64)
    eps = torch.randn(16, 2, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * 0.9 + 0.05
    x_t, _ = pe.training_pair(x0, t, eps)
    _, v = pv.training_pair(x0, t, eps)
    torch.testing.assert_close(pv.epsilon(v, x_t, t), eps)
    torch.testing.assert_close(pe.velocity(eps, x_t, t), v)
    torch.testing.assert_close(pv.score(v, x_t, t), pe.score(eps, x_t, t))


def test_ot_path_endpoints():
    p = make_process("ot", sigma_min=0.0)
    x0, eps = torch.randn(4, 2), torch.randn(4, 2)
    x1, target = p.training_pair(x0, torch.ones(4), eps)
    torch.testing.assert_close(x1, eps)
    torch.testing.assert_close(target, eps - x0)


def test_prior_log_prob_is_standard_normal():
    x = torch.randn(5, 3, dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)
    torch.testing.assert_close(make_process("vp").prior_log_prob(x), ref)


def test_unknown_process_and_prediction():
    with pytest.raises(ValueError, match="unknown process"):
        make_process("ve")
    with pytest.raises(ValueError, match="unknown prediction"):
        make_process("vp", prediction="noise")  # type: ignore[arg-type]
