"""``likelihood``: the likelihood-weighted objective, with importance-sampled times.

The score-matching bound on the negative log-likelihood (Song et al. 2021, "Maximum likelihood
training of score-based diffusion models", thm. 1) splits over a partition's blocks into one
term per block (:mod:`psm.core.heldout`),

    J_b = ∫_{t_lo}^{t_hi} ½ g(t)² E ‖s_θ(x_t, t) − ∇log p_t(x_t)‖² dt,

whose denoising form is ``∫ ½ g²/σ² E‖ε̂ − ε‖² dt`` up to a network-free constant. A block
whose net predicts something other than ε has ``ε̂ − ε = C(t) (out − target)``
(:meth:`Process.epsilon_affine`), so in its own output the term reads

    L_b = ∫_{t_lo}^{t_hi} ½ λ(t) E ‖out − target‖² dt,    λ(t) = g(t)² C(t)² / σ(t)²

(for ε-prediction ``C = 1`` and ``λ = g²/σ²``, Song et al.'s likelihood weighting; for VP
``g² = b(t)``, eq. 28). The objective draws ``t`` from a density ``q`` on the block and weights
each sample by ``w = ½ λ(t) / q(t)``; :meth:`Objective.loss` averages ``w · mean_d (out −
target)²`` over the batch, so

    E[D · loss] = ∫ q(t) · ½ λ(t)/q(t) · E‖out − target‖² dt = L_b

for any q that is positive on the block (D: dimensions per sample): ``D · loss`` is an unbiased
estimate of the block's term of the bound, up to the constant.

Two proposals (``sampling``):

* ``uniform``: ``t ~ U[t_lo, t_hi]``, ``w = ½ (t_hi − t_lo) λ(t)``. Near t = 0, ``λ ≈ 2/t`` (ε), so
  the weight of the first block is heavy-tailed (its variance grows like ``1/t_lo``).
* ``importance`` (default): ``q ∝ g²/σ²`` on the block — the bound's own weight in ε units,
  i.e. ``q ∝ λ`` for ε-prediction — so ``w = ½ Z C(t)²`` with ``Z = ∫_block g²/σ² dt``; for
  ε-prediction ``w = ½ Z`` is a constant and the weight adds no variance at all, only
  ``‖ε̂ − ε‖²`` varies. This is the practice of likelihood-weighted training with
  importance-sampled times of Song et al. 2021 (and ScoreFlow) and of i-DODE (Zheng et al.
  2023, "Improved techniques for maximum likelihood estimation for diffusion ODEs"). Within a
  PSM block ``g²/σ²`` varies mildly (a factor 2 on [0.1, 1] for VP) except in the first block
  (``[t0, t1]``, where it follows ``2/t`` over the orders of magnitude of ``t``), so it matters
  most there.

  Why ``g²/σ²`` and not λ for the other predictions: the integrand is
  ``½ g²/σ² E‖ε̂ − ε‖²`` whatever the net outputs, and a net's ε error is roughly flat in t
  while its output error ``‖ε̂ − ε‖²/C²`` is not (``σ²/α²`` for x0, ``1/α²`` for v near t = 1,
  ``(g²/2σ)²`` for the OT velocity near t = 1). A proposal ``∝ λ`` follows ``C²`` instead of the
  integrand and is worse than uniform there (on Gaussian data, about 90× the uniform variance
  for x0 on ``[1e-4, 0.01]`` and 20× for the OT velocity on ``[0.3, 1]``, where ``q ∝ g²/σ²``
  gives a tenth and a two-hundredth of it); ``q ∝ g²/σ²`` gives one model the same estimator
  in every parametrization.

  For VP the proposal is exact in closed form: with ``B(t) = ∫₀ᵗ b``,
  ``g²/σ² = b/(1 − e^{−B})`` and ``∫ b/(1 − e^{−B}) dt = log expm1(B)``, so the CDF is
  ``(Λ(t) − Λ(t_lo)) / Z`` with ``Λ = log expm1(B)``, ``Z = Λ(t_hi) − Λ(t_lo)``, and its
  inverse solves ``B(t) = softplus(Λ)`` for t (:class:`VPProposal`). Any other schedule uses a
  tabulated proposal (:class:`TabulatedProposal`): q piecewise constant on a fine geometric
  grid, each cell's mass the trapezoid integral of ``g²/σ²`` over it, and ``w = ½ λ(t)/q(t)``
  for that q exactly — unbiased whatever the tabulation's accuracy; only the variance depends
  on how well q follows ``g²/σ²``.

A DPSM grid point (``t_lo = t_hi``) has no integral: its batches sit at the point's time with
no weight (the plain MSE of Algorithm 2; a constant weight would only rescale the block's loss).
``t_lo <= 0`` is refused: λ is not integrable at t = 0 (the partition's floor t0 > 0 keeps
every block above it).

Times are drawn in float64 (one uniform per sample, from the block's generator, on its device)
and handed to the batch in the default float dtype; the weight is computed at the float64 time.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ..process import Process, Schedule, VPSchedule
from .base import Objective, ObjectiveSpec

CELLS = 4096
"""Cells of the tabulated proposal's grid on ``[t_lo, t_hi]`` (geometric spacing)."""


def likelihood_weight(process: Process, t: Tensor) -> Tensor:
    """``λ(t) = g(t)² C(t)² / σ(t)²`` for the process's prediction, the shape of ``t``.

    ``C`` is the output-to-ε factor of :meth:`Process.epsilon_affine`; ``½ λ ‖out − target‖²``
    is then ``½ g²/σ² ‖ε̂ − ε‖²``, the integrand of the denoising bound (Song et al. 2021).
    Pass float64 times for float64 weights.
    """
    _, big_c = process.epsilon_affine(t)
    return bound_weight(process.schedule, t) * big_c * big_c


def bound_weight(schedule: Schedule, t: Tensor) -> Tensor:
    """``g(t)²/σ(t)²``: λ of ε-prediction, what the importance proposal follows; the shape of
    ``t``."""
    c = schedule(t)
    return c.g2 / (c.sigma * c.sigma)


def _softplus(x: Tensor) -> Tensor:
    """``log(1 + e^x)`` without overflow or cancellation (exact in float64 for any x)."""
    return x.clamp(min=0.0) + torch.log1p(torch.exp(-x.abs()))


def _log_expm1(x: Tensor) -> Tensor:
    """``log(e^x − 1)`` for ``x > 0``, accurate for tiny and large x."""
    return x + torch.log(-torch.expm1(-x))


class Proposal(ABC):
    """A density ``q`` on ``[t_lo, t_hi]`` to draw times from, and the ratio ``p/q`` each draw
    carries for the positive function ``p`` it was built for (``g²/σ²``). Everything is
    float64.

    Args:
        p: ``p(t)``, float64 times of any shape to the same shape.
        t_lo, t_hi: the block, ``0 < t_lo < t_hi``.
    """

    def __init__(self, p: Callable[[Tensor], Tensor], t_lo: float, t_hi: float) -> None:
        self.p = p
        self.t_lo, self.t_hi = float(t_lo), float(t_hi)

    @abstractmethod
    def draw(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Times for uniforms ``u [n]`` in ``[0, 1)`` by the inverse CDF: ``(t [n], p(t)/q(t)
        [n])``, float64, on u's device."""

    @abstractmethod
    def cdf(self, t: Tensor) -> Tensor:
        """``∫_{t_lo}^t q``, float64, the shape of ``t``."""


class UniformProposal(Proposal):
    """``q = 1 / (t_hi − t_lo)``: ``p/q = (t_hi − t_lo) p(t)``."""

    def draw(self, u: Tensor) -> tuple[Tensor, Tensor]:
        width = self.t_hi - self.t_lo
        t = (self.t_lo + width * u.to(torch.float64)).clamp(self.t_lo, self.t_hi)
        return t, width * self.p(t)

    def cdf(self, t: Tensor) -> Tensor:
        return ((t.to(torch.float64) - self.t_lo) / (self.t_hi - self.t_lo)).clamp(0.0, 1.0)


class VPProposal(Proposal):
    """``q ∝ p = g²/σ² = b/(1 − e^{−B})`` exactly, for the VP schedule (closed form).

    ``Λ(t) = log expm1(B(t))`` is an antiderivative of p, so ``Z = Λ(t_hi) − Λ(t_lo)``, the
    CDF is ``(Λ(t) − Λ(t_lo)) / Z`` and ``p/q = Z`` for every draw. The inverse CDF takes
    ``B = softplus(Λ(t_lo) + u Z)`` and solves ``b_min t + ½ (b_max − b_min) t² = B`` as
    ``t = 2B / (b_min + √(b_min² + 2 (b_max − b_min) B))`` (no cancellation as t → 0).

    Args:
        schedule: the VP schedule, ``0 <= b_min <= b_max``, ``b_max > 0``.
        t_lo, t_hi: the block, ``0 < t_lo < t_hi``.
    """

    def __init__(self, schedule: VPSchedule, t_lo: float, t_hi: float) -> None:
        super().__init__(lambda t: bound_weight(schedule, t), t_lo, t_hi)
        self.b_min, self.slope = float(schedule.b_min), float(schedule.b_max - schedule.b_min)
        ends = self._big_lambda(torch.tensor([t_lo, t_hi], dtype=torch.float64))
        self.lam_lo = float(ends[0])
        self.total = float(ends[1] - ends[0])
        """``Z = ∫_block g²/σ² dt``."""

    def _big_lambda(self, t: Tensor) -> Tensor:
        """``Λ(t) = log expm1(B(t))``, float64."""
        return _log_expm1(t * (self.b_min + 0.5 * self.slope * t))

    def inverse_cdf(self, u: Tensor) -> Tensor:
        """The time at CDF value ``u`` (any shape), float64."""
        big_b = _softplus(self.lam_lo + self.total * u.to(torch.float64))
        root = torch.sqrt(self.b_min * self.b_min + 2.0 * self.slope * big_b)
        return (2.0 * big_b / (self.b_min + root)).clamp(self.t_lo, self.t_hi)

    def draw(self, u: Tensor) -> tuple[Tensor, Tensor]:
        t = self.inverse_cdf(u)
        return t, torch.full_like(t, self.total)

    def cdf(self, t: Tensor) -> Tensor:
        return ((self._big_lambda(t.to(torch.float64)) - self.lam_lo) / self.total).clamp(0, 1)


class TabulatedProposal(Proposal):
    """``q`` piecewise constant on a geometric grid of ``cells`` cells, mass ∝ the trapezoid
    integral of p over each cell; drawn by its exact inverse CDF (the cell by a search of the
    cumulative masses, then uniform within it), with ``p/q = p(t) · width / mass`` of the
    drawn cell — exact for this q however coarse the grid. Built once per block (a few
    thousand evaluations of p).

    Args:
        p: ``p(t)`` for float64 times; positive and finite on the block.
        t_lo, t_hi: the block, ``0 < t_lo < t_hi``.
        cells: the number of cells.

    Raises:
        ValueError: p is not positive and finite on the grid.
    """

    def __init__(
        self, p: Callable[[Tensor], Tensor], t_lo: float, t_hi: float, cells: int = CELLS
    ) -> None:
        super().__init__(p, t_lo, t_hi)
        edges = torch.exp(
            torch.linspace(math.log(t_lo), math.log(t_hi), cells + 1, dtype=torch.float64)
        )
        edges[0], edges[-1] = t_lo, t_hi
        values = p(edges)
        if not bool(torch.isfinite(values).all() and (values > 0).all()):
            raise ValueError(f"the weight g²/σ² is not positive and finite on [{t_lo}, {t_hi}]")
        width = edges[1:] - edges[:-1]
        mass = 0.5 * (values[1:] + values[:-1]) * width
        self.total = float(mass.sum())
        """The trapezoid estimate of ``∫_block p dt`` (only q's normalizer)."""
        self.edges, self.width, self.mass = edges, width, mass / mass.sum()
        self.cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(self.mass, 0)])
        self.cum[-1] = 1.0
        self._on: dict[torch.device, tuple[Tensor, ...]] = {}

    def _tables(self, device: torch.device) -> tuple[Tensor, ...]:
        """``(edges, width, mass, cum)`` on ``device`` (copied once per device)."""
        if device not in self._on:
            self._on[device] = tuple(
                x.to(device) for x in (self.edges, self.width, self.mass, self.cum)
            )
        return self._on[device]

    def draw(self, u: Tensor) -> tuple[Tensor, Tensor]:
        edges, width, mass, cum = self._tables(u.device)
        u = u.to(torch.float64)
        cell = (torch.searchsorted(cum, u, right=True) - 1).clamp(0, mass.numel() - 1)
        frac = ((u - cum[cell]) / mass[cell]).clamp(0.0, 1.0)
        t = (edges[cell] + frac * width[cell]).clamp(self.t_lo, self.t_hi)
        return t, self.p(t) * width[cell] / mass[cell]

    def cdf(self, t: Tensor) -> Tensor:
        edges, width, mass, cum = self._tables(t.device)
        t = t.to(torch.float64).clamp(self.t_lo, self.t_hi)
        cell = (torch.searchsorted(edges, t, right=True) - 1).clamp(0, mass.numel() - 1)
        return (cum[cell] + mass[cell] * (t - edges[cell]) / width[cell]).clamp(0.0, 1.0)


def make_proposal(
    schedule: Schedule, t_lo: float, t_hi: float, sampling: str, *, tabulate: bool = False
) -> Proposal:
    """The proposal of ``sampling`` for a block ``0 < t_lo < t_hi``, built for ``p = g²/σ²``.

    ``importance`` is closed form for VP (:class:`VPProposal`), tabulated for any other
    schedule or when ``tabulate`` (:class:`TabulatedProposal`).
    """

    def p(t: Tensor) -> Tensor:
        return bound_weight(schedule, t)

    if sampling == "uniform":
        return UniformProposal(p, t_lo, t_hi)
    if sampling != "importance":
        raise ValueError(f"unknown sampling {sampling!r} (choose from importance, uniform)")
    if (
        not tabulate
        and type(schedule) is VPSchedule
        and 0.0 <= schedule.b_min <= schedule.b_max
        and schedule.b_max > 0.0
    ):
        return VPProposal(schedule, t_lo, t_hi)
    return TabulatedProposal(p, t_lo, t_hi)


class LikelihoodObjective(Objective):
    """Likelihood-weighted times and weights: ``t ~ q`` on the block, ``w = ½ λ(t)/q(t)`` with
    ``λ = g² C² / σ²`` (see the module docstring); ``D · loss`` is an unbiased estimate of the
    block's term of the likelihood bound, up to a network-free constant.

    Args:
        process: the run's process, carrying the block's prediction.
        t_lo, t_hi: the block, ``0 < t_lo <= t_hi``; equal for a DPSM grid point (its fixed time,
            no weight).
        sampling: ``"importance"`` (``q ∝ g²/σ²``; ``w = ½ Z C²``) or ``"uniform"``.
        tabulate: use the tabulated proposal even where the closed form exists (tests).

    Raises:
        ValueError: ``t_lo <= 0`` (λ is not integrable at t = 0), in one line.
    """

    def __init__(
        self,
        process: Process,
        t_lo: float,
        t_hi: float,
        sampling: Literal["importance", "uniform"] = "importance",
        *,
        tabulate: bool = False,
    ) -> None:
        super().__init__(process, t_lo, t_hi)
        if self.t_lo <= 0.0:
            raise ValueError(
                f"the likelihood objective needs t_lo > 0: λ(t) ~ 1/t is not integrable at "
                f"t = 0, got [{t_lo}, {t_hi}]"
            )
        self.sampling = sampling
        self.proposal: Proposal | None = None
        if self.t_hi > self.t_lo:
            self.proposal = make_proposal(
                process.schedule, self.t_lo, self.t_hi, sampling, tabulate=tabulate
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}([{self.t_lo:.6g}, {self.t_hi:.6g}], {self.process!r}, "
            f"sampling={self.sampling!r})"
        )

    def times(
        self, n: int, generator: torch.Generator, device: torch.device
    ) -> tuple[Tensor, Tensor | None]:
        """``n`` times from the proposal and their weights ``½ λ/q = ½ C² (g²/σ²)/q``, ``[n]``
        each (one float64 uniform per sample from ``generator``); a grid point's time and None.
        """
        dtype = torch.get_default_dtype()
        if self.proposal is None:
            return torch.full((n,), self.t_lo, device=device, dtype=dtype), None
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        t, ratio = self.proposal.draw(u)
        if self.process.prediction != "epsilon":  # C = 1 for ε: ½ Z exactly under importance
            _, big_c = self.process.epsilon_affine(t)
            ratio = ratio * big_c * big_c
        return t.to(dtype), (0.5 * ratio).to(dtype)


class LikelihoodSpec(ObjectiveSpec):
    """``train.objective: {name: likelihood, sampling: importance}``: the likelihood-weighted
    objective (Song et al. 2021), times importance-sampled ``∝ g²/σ²`` (or ``uniform``)."""

    name: Literal["likelihood"] = "likelihood"
    sampling: Literal["importance", "uniform"] = "importance"

    def build(self, process: Process, t_lo: float, t_hi: float) -> Objective:
        return LikelihoodObjective(process, t_lo, t_hi, self.sampling)
