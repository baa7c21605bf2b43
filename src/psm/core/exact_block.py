"""A block that returns the data's exact score: where a model's likelihood is lost, by block.

For data whose noised marginals have a closed form (the 2D mixtures), any block of a trained
model can be replaced by the exact field: the block returns what the process's network would
predict for the exact score (``ε = −σ_t ∇ log p_t``, eq. 30, turned into the process's
prediction). A model whose every block is exact integrates the true probability-flow ODE, whose
likelihood at t0 is the data's (up to the solver's error; docs/results.md, "The solver is not the
problem"). A model with only block b trained and every other block exact loses, against that,
what block b's field costs the ODE likelihood alone — the per-block account of the NLL itself,
which the score-matching bound (:mod:`psm.core.block_kl`) does not give: the bound is on the
SDE's likelihood, not the ODE's (Lu et al. 2022, "Maximum likelihood training for score-based
diffusion ODEs by high-order denoising score matching").

The exact trace of such a block comes from autograd through the closed form (a graph is kept
from x to the score).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .model import Block, BlockModel
from .process import Process

DifferentiableScore = Callable[..., Tensor]
"""``(x [n, *D], α, σ, differentiable=True) -> ∇ log p_t(x) [n, *D]`` with a graph from x."""


def exact_block(process: Process, score: DifferentiableScore) -> Block:
    """A block ``(x [B, *D], t [B]) -> network output [B, *D]`` built from the exact score.

    Args:
        process: the run's process (its schedule and prediction).
        score: the data's exact marginal score (``Mixture.marginal_score``), called with
            ``differentiable=True``.
    """

    def block(x: Tensor, t: Tensor) -> Tensor:
        times = torch.unique(t)
        out = x.new_zeros(x.shape)
        for tv in times:
            rows = (t == tv).nonzero().squeeze(1)
            c = process.schedule(tv.detach().to(torch.float64))
            a, s = float(c.alpha), float(c.sigma)
            xs = x.index_select(0, rows)
            s_star = score(xs, a, s, differentiable=True).to(x.dtype)
            eps = -s * s_star
            out = out.index_copy(0, rows, process.from_epsilon(eps, xs, t.index_select(0, rows)))
        return out

    return block


def with_exact_blocks(
    model: BlockModel, score: DifferentiableScore, blocks: Sequence[int]
) -> BlockModel:
    """``model`` with the given blocks replaced by :func:`exact_block` (grid models refused: a
    DPSM block's net is evaluated at its grid time, not along the block)."""
    if model.is_grid:
        raise ValueError("exact blocks are for interval partitions (TPSM, SA-DPM)")
    bad = [b for b in blocks if not 0 <= b < model.num_blocks]
    if bad:
        raise ValueError(f"block(s) {bad} out of range 0-{model.num_blocks - 1}")
    exact, chosen = exact_block(model.process, score), set(blocks)
    new = [exact if b in chosen else fn for b, fn in enumerate(model.blocks)]
    return BlockModel(model.process, model.partition, new, grid_field=model.grid_field,
                      shape=model.shape)  # fmt: skip
