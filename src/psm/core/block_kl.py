"""Where a trained model's error lies in time: the KL bound split by block.

For data whose noised marginals ``p_t`` have a closed form (the 2D mixtures), the score-matching
bound on the likelihood (Song et al. 2021, "Maximum likelihood training of score-based diffusion
models", thm. 1; the weighting ``λ(t) = g(t)²`` of the paper's eq. 1 loss) splits over the blocks
of a partition:

    KL(p_t0 ‖ p_θ) ≤ Σ_blocks ∫_{t_lo}^{t_hi} ½ g(t)² E_{x ~ p_t} ‖s_θ(x, t) − ∇ log p_t(x)‖² dt
                     + KL(p_1 ‖ N(0, I)),

with ``s_θ`` the model's score (eq. 30: ``−ε_θ / σ_t``) and ``g²`` the forward SDE's squared
diffusion (``b(t)`` for VP). Each block's term says how much of the likelihood gap it is
responsible for, which is what a per-block step allocation (``train.block_steps``) should follow.
For a flow-matching model the same figure is the bound of the SDE with the model's score (the
ODE's own likelihood has no such split); it still ranks the blocks.

The time integral of a block is a midpoint rule in ``log t`` (``dt = t d log t``: the integrand
varies on the scale of ``t`` near 0), with fresh points ``x_t = α x0 + σ ε`` at every node.

Data without a closed-form score get the same term up to a network-free constant, from the
conditional score ``−ε/σ_t``: :mod:`psm.core.heldout` (the trainer's per-block signal and
``psm kl --estimate``), stratified in the same ``log t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import BlockModel

Sampler = Callable[[int, torch.Generator], Tensor]
"""``(n, generator) -> [n, *D]`` data points ``x0``."""
MarginalScore = Callable[[Tensor, float, float], Tensor]
"""``(x [n, *D], α, σ) -> ∇ log p_t(x) [n, *D]`` exactly, for ``x_t = α x0 + σ ε``."""


@dataclass(frozen=True)
class BlockKL:
    """One block's share of the KL bound.

    Attributes:
        block: the block id.
        t_lo: lower end of the block's segment (with the floor t0).
        t_hi: upper end.
        kl: ``∫ ½ g² E‖s_θ − s*‖² dt`` over the segment, nats.
        stderr: its Monte Carlo standard error.
    """

    block: int
    t_lo: float
    t_hi: float
    kl: float
    stderr: float


def block_kl(
    model: BlockModel,
    sample: Sampler,
    score: MarginalScore,
    *,
    points: int = 2000,
    times: int = 16,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    blocks: list[int] | None = None,
) -> list[BlockKL]:
    """Each block's term of the KL bound (module docstring), by Monte Carlo.

    Args:
        model: the block model (any process; the score comes from ``process.score``).
        sample: data points ``x0``.
        score: the exact marginal score.
        points: points per time node.
        times: time nodes per block (midpoints in ``log t``).
        generator: the random source (default: seeded 0).
        dtype: the dtype the nets are evaluated in.
        blocks: only these blocks (default: all). The draws depend on the selection and the
            generator, never on the model: two models measured with the same selection and
            seed see the same points, times and noise (a paired comparison).

    Returns:
        One :class:`BlockKL` per measured block, in block order.
    """
    if points < 2 or times < 1:
        raise ValueError(f"need points >= 2 and times >= 1, got {points} and {times}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    schedule = model.process.schedule
    out = []
    for seg in model.segments():
        if blocks is not None and seg.block not in blocks:
            continue
        lo, hi = seg.t_lo, seg.t_hi
        if lo <= 0:
            raise ValueError(f"block {seg.block} starts at t = {lo}: the split needs t0 > 0")
        edges = torch.linspace(math.log(lo), math.log(hi), times + 1, dtype=torch.float64)
        mids = torch.exp(0.5 * (edges[:-1] + edges[1:])).tolist()
        width = float(edges[1] - edges[0])  # d log t per node
        total = var = 0.0
        for t in mids:
            c = schedule(torch.tensor(t, dtype=torch.float64))
            a, s, g2 = float(c.alpha), float(c.sigma), float(c.g2)
            x0 = sample(points, gen).to(torch.float64)
            noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
            xt = a * x0 + s * noise
            exact = score(xt, a, s).to(torch.float64)
            x_in, t_in = xt.to(dtype), torch.full((points,), t, dtype=dtype)
            with torch.no_grad():
                out_t = model.output(x_in, t_in, seg.block)
                learned = model.process.score(out_t, x_in, t_in).to(torch.float64)
            err = (learned - exact).flatten(1).pow(2).sum(1)  # [points]
            w = 0.5 * g2 * t * width
            total += w * float(err.mean())
            var += w * w * float(err.var()) / points
        out.append(BlockKL(seg.block, lo, hi, total, math.sqrt(var)))
    return out
