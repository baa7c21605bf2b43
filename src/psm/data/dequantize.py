r"""Dequantization of image levels for the likelihood: uniform, or truncated-normal (i-DODE).

A model density :math:`p` over the model's space turns into a probability of the levels
:math:`k` through the level's bin :math:`B_k` (width :math:`s / L` per dimension in the model's
space ``y = s (x - m)``, :mod:`psm.data.images`): :math:`P(k) = \int_{B_k} p(y)\,dy`. For any
density :math:`q` supported in :math:`B_k` (Jensen; Theis et al. 2016, Ho et al. 2019)

.. math::

    \log P(k) \;\ge\; \mathbb{E}_{y \sim q}\big[\log p(y) - \log q(y)\big],
    \qquad \mathrm{bpd} \le \frac{\mathbb{E}_q[-\log p(y) + \log q(y)]}{D \ln 2}.

* **uniform** (psm's default, :meth:`~psm.data.images.ImageDataset.levels_to_unit`): ``q`` is
  uniform on the bin, :math:`\log q = D (\log L - \log s)`, which gives
  :meth:`~psm.data.images.ImageDataset.bits_per_dim`'s ``(NLL - D log s) / (D ln 2) + log2 L``.
* **truncated-normal** (Zheng, Lu, Chen & Zhu 2023, "Improved Techniques for Maximum
  Likelihood Estimation for Diffusion ODEs", ICML: the training-free truncated-normal
  dequantization of i-DODE): ``y = c_k + δ`` with ``c_k`` the bin's centre and, per dimension,
  :math:`\delta = r\,\eta`, :math:`r = \sigma_{t_0} / \alpha_{t_0}` (the noise the model saw at
  its time floor, in the data's units) and :math:`\eta` a standard normal truncated to
  :math:`|\eta| \le \tau = h / r`, :math:`h = s / (2L)` half the bin. Per dimension

  .. math::

      \log q(\delta) = \log\varphi(\eta) - \log r - \log\big(\Phi(\tau) - \Phi(-\tau)\big),

  and :math:`\Phi(\tau) - \Phi(-\tau) = \operatorname{erf}(\tau / \sqrt 2)`.

This module holds the math on plain tensors (:class:`TruncatedNormal`); mapping a dataset's
levels and scoring live in :mod:`psm.runs.inference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from ..errors import PSMError

if TYPE_CHECKING:
    from ..core.process import Process

Dequantization = Literal["uniform", "truncated-normal"]
UNIFORM = "uniform"
TRUNCATED_NORMAL = "truncated-normal"
DEQUANTIZATIONS: tuple[str, ...] = (UNIFORM, TRUNCATED_NORMAL)
"""The dequantizations of image levels for bits/dim (module docstring)."""
ALIASES = {"tn": TRUNCATED_NORMAL, "truncated_normal": TRUNCATED_NORMAL}
"""Short names accepted wherever a dequantization is named."""

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def dequantization_name(name: str) -> str:
    """The dequantization's canonical name (``"tn"`` is ``"truncated-normal"``).

    Raises:
        PSMError: an unknown name.
    """
    canonical = ALIASES.get(name, name)
    if canonical not in DEQUANTIZATIONS:
        raise PSMError(
            f"unknown dequantization {name!r} (choose from uniform, truncated-normal or tn)"
        )
    return canonical


def noise_to_signal(process: Process, t0: float) -> float:
    """``σ_t0 / α_t0`` of the process at the time floor (float64): the standard deviation of
    the model's own noise at ``t0`` in the data's units, ``x_t0 / α_t0 = x + (σ/α) ε``."""
    c = process.schedule(torch.tensor(float(t0), dtype=torch.float64))
    return float(c.sigma / c.alpha)


@dataclass(frozen=True)
class TruncatedNormal:
    """Per dimension, ``δ = scale · η`` with ``η ~ N(0, 1)`` truncated to ``|η| ≤ τ``,
    ``τ = half_width / scale``: supported inside a bin ``[c - h, c + h]``.

    Attributes:
        scale: ``r = σ_t0 / α_t0`` in the model's units (> 0).
        half_width: ``h``, half a bin in the model's units (> 0).
    """

    scale: float
    half_width: float

    def __post_init__(self) -> None:
        for name in ("scale", "half_width"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise PSMError(f"truncated-normal dequantization: {name} must be > 0, got {v}")

    @property
    def bound(self) -> float:
        """``τ = h / r``: where ``η`` is cut."""
        return self.half_width / self.scale

    @property
    def log_mass(self) -> float:
        """``log(Φ(τ) - Φ(-τ)) = log erf(τ / √2)``: the normal's mass kept (≤ 0)."""
        return math.log(math.erf(self.bound / math.sqrt(2.0)))

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """``δ`` float64 of ``shape`` on ``generator.device``, every entry in ``[-h, h]``.

        Inverse CDF in float64: ``η = Φ⁻¹(Φ(-τ) + u (Φ(τ) - Φ(-τ)))`` with ``u ~ U[0, 1)``
        (one uniform per entry, so a seed fixes the draw), clamped to ``[-τ, τ]`` against
        rounding.
        """
        return self.scale * truncated_standard_normal(shape, self.bound, generator)

    def log_prob(self, delta: Tensor) -> Tensor:
        """``log q(δ)`` summed over all but the first dimension: ``δ [N, *D]`` → ``[N]``
        float64 (``-inf`` outside the bin)."""
        eta = delta.to(torch.float64) / self.scale
        per = -0.5 * eta * eta - _HALF_LOG_2PI - math.log(self.scale) - self.log_mass
        per = torch.where(eta.abs() <= self.bound, per, torch.full_like(per, -math.inf))
        return per.flatten(1).sum(1)

    def entropy(self, dims: int = 1) -> float:
        """``-E_q[log q]`` over ``dims`` dimensions, in nats: per dimension
        ``log(√(2πe) r Z) - τ φ(τ) / Z`` with ``Z = Φ(τ) - Φ(-τ)``."""
        tau = self.bound
        z = math.erf(tau / math.sqrt(2.0))
        phi = math.exp(-0.5 * tau * tau - _HALF_LOG_2PI)
        per = 0.5 + _HALF_LOG_2PI + math.log(self.scale) + math.log(z) - tau * phi / z
        return dims * per


def truncated_standard_normal(
    shape: tuple[int, ...], bound: float, generator: torch.Generator
) -> Tensor:
    """``η ~ N(0, 1)`` truncated to ``[-bound, bound]``, float64 ``shape`` on the generator's
    device (inverse CDF, see :meth:`TruncatedNormal.sample`)."""
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device)
    lo = torch.special.ndtr(torch.tensor(-bound, dtype=torch.float64))
    mass = math.erf(bound / math.sqrt(2.0))  # Φ(τ) - Φ(-τ) without cancellation
    eta = torch.special.ndtri(lo.to(u.device) + u * mass)
    return eta.clamp_(-bound, bound)


__all__ = [
    "ALIASES", "DEQUANTIZATIONS", "TRUNCATED_NORMAL", "UNIFORM", "Dequantization",
    "TruncatedNormal", "dequantization_name", "noise_to_signal", "truncated_standard_normal",
]  # fmt: skip
