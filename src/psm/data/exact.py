"""What data with exact noised marginals (:class:`~psm.data.base.ExactDensity`) give beyond
their densities: the NLL floor of a likelihood that starts at ``t0``."""

from __future__ import annotations

import torch

from .base import DataError, Dataset, ExactDensity


def nll_floor(
    dataset: Dataset, alpha: float, sigma: float, *, samples: int, seed: int, chunk: int = 100_000
) -> float:
    """``E_{x0 ~ data}[-log p_t(x0)]`` with ``p_t`` the law of ``x_t = α x0 + σ ε``, by Monte
    Carlo over ``samples`` data points (its standard error is about ``1/sqrt(samples)``).

    A likelihood integrated from ``t0`` scores the data under ``p_{t0}`` at best, so this, at
    ``t0``'s ``(α, σ)``, is the NLL no model can beat; at ``σ → 0`` it is the entropy.

    Args:
        dataset: data with exact marginals.
        alpha, sigma: the marginal's ``α_t`` and ``σ_t``.
        samples: data points drawn.
        seed: seed of the draw.
        chunk: points per density evaluation (bounds the memory).

    Raises:
        DataError: the dataset has no exact marginal density.
    """
    if not isinstance(dataset, ExactDensity):
        raise DataError(f"dataset {dataset.name!r} has no exact marginal density (no NLL floor)")
    x = dataset.sample(samples, torch.Generator().manual_seed(seed))
    lp = torch.cat([dataset.marginal_log_prob(xb, alpha, sigma) for xb in x.split(chunk)])
    return -float(lp.mean())
