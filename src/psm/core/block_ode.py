"""Where the ODE likelihood is lost, by block: each block's own KL through the probability-flow
ODE, for data whose noised marginals ``p_t`` have a closed form (the 2D mixtures).

:mod:`psm.core.block_kl` splits the score-matching bound by block, but that bounds the
likelihood of the reverse *SDE* with the model's score; psm's NLL is the probability-flow
*ODE*'s (appendix A), which the bound does not control (Lu et al. 2022, "Maximum likelihood
training for score-based diffusion ODEs by high-order denoising score matching"): on TY a model
whose bound is 0.04 nats can lose 0.14 through the ODE (docs/results.md). This module gives the
ODE's own account. Block b integrates its field ``f_b`` (eq. 30) over its segment
``[t_lo, t_hi]``, mapping ``x ~ p_{t_lo}`` to ``ψ_b(x)`` with log-determinant
``Δ_b(x) = ∫ tr ∂f_b/∂x dt``. If every other block were exact — the true flow, which carries
``p_t0`` onto ``p_{t_lo}`` and ``p_{t_hi}`` onto ``p_1`` with no loss — the model's NLL would
exceed ``−log p_t0`` by, on average,

    L_b = E_{x ~ p_{t_lo}} [ log p_{t_lo}(x) − log p_{t_hi}(ψ_b(x)) − Δ_b(x) ]
        = KL(p_{t_lo} ‖ ψ_b^{-1} # p_{t_hi}) ≥ 0,

plus the prior's term ``E[log p_1 − log N(0, I)]`` at the far end (:func:`prior_kl`). ``psm nll
--exact-blocks`` (every block but b exact) measures the same thing through the whole ODE; this
is its cheap form: one block's solve on fresh draws of ``p_{t_lo}`` (forward noising), the two
densities in closed form. The terms do not add up to a model's NLL gap exactly (blocks' errors
compound through the flow), but each says what its block alone costs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .block_kl import BlockKL, Sampler
from .likelihood import exact_dynamics
from .model import BlockModel
from .ode import SolverSettings, integrate_blocks, steps_for

MarginalLogProb = Callable[[Tensor, float, float], Tensor]
"""``(x [n, *D], α, σ) -> log p_t(x) [n]`` float64 exactly, for ``x_t = α x0 + σ ε``."""


def _alpha_sigma(model: BlockModel, t: float) -> tuple[float, float]:
    c = model.process.schedule(torch.tensor(t, dtype=torch.float64))
    return float(c.alpha), float(c.sigma)


def block_ode_kl(
    model: BlockModel,
    sample: Sampler,
    marginal_log_prob: MarginalLogProb,
    *,
    points: int,
    solver: SolverSettings,
    generator: torch.Generator,
    blocks: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[BlockKL]:
    """Each block's ``L_b`` (module docstring) on ``points`` fresh draws of ``p_{t_lo}``.

    Args:
        model: the assembled blocks (interval partitions).
        sample: draws data points ``x0`` ``(n, generator) -> [n, *D]``.
        marginal_log_prob: the data's exact noised log-density.
        points: draws per block.
        solver: a fixed-step solver; its steps over ``[t0, 1]`` are split among the blocks as
            ``psm nll`` splits them, so each block integrates with the steps it gets there.
        generator: the draws' random source.
        blocks: only these blocks (default all).
        dtype: what the nets are evaluated in (the densities are float64).

    Returns:
        One row per block, in increasing time (a :class:`~psm.core.block_kl.BlockKL` whose
        ``kl`` is ``L_b``).
    """
    if model.is_grid:
        raise ValueError("the ODE split by block is for interval partitions (TPSM, SA-DPM)")
    if not solver.fixed_step:
        raise ValueError(f"a fixed-step solver, not {solver.method}")
    segments = model.segments()
    counts = steps_for(segments, solver.steps, solver.grid)
    dynamics = exact_dynamics(model)
    out = []
    for seg, n in zip(segments, counts, strict=True):
        if blocks is not None and seg.block not in blocks:
            continue
        a_lo, s_lo = _alpha_sigma(model, seg.t_lo)
        a_hi, s_hi = _alpha_sigma(model, seg.t_hi)
        x0 = sample(points, generator).to(torch.float64)
        x = a_lo * x0 + s_lo * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        one = SolverSettings(solver.method, steps=n, grid=solver.grid)
        with torch.no_grad():
            y0 = (x.to(dtype), torch.zeros(points, dtype=dtype))
            x_hi, delta = integrate_blocks(dynamics, y0, [seg], direction="to_noise", solver=one)
        loss = (
            marginal_log_prob(x, a_lo, s_lo)
            - marginal_log_prob(x_hi.double(), a_hi, s_hi)
            - delta.double()
        )
        se = float(loss.std()) / math.sqrt(points)
        out.append(BlockKL(seg.block, seg.t_lo, seg.t_hi, float(loss.mean()), se))
    return out


def prior_kl(
    model: BlockModel,
    sample: Sampler,
    marginal_log_prob: MarginalLogProb,
    *,
    points: int,
    generator: torch.Generator,
) -> tuple[float, float]:
    """``E_{x ~ p_1}[log p_1(x) − log N(x; 0, I)]`` (the prior's share, nats) ± s.e."""
    a, s = _alpha_sigma(model, 1.0)
    x0 = sample(points, generator).to(torch.float64)
    x = a * x0 + s * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    loss = marginal_log_prob(x, a, s) - model.process.prior_log_prob(x).double()
    return float(loss.mean()), float(loss.std()) / math.sqrt(points)
