"""Classic 2D toy sets (FFJORD / flow-matching conventions), each an exactly stated distribution.

Every set lies roughly within [-4, 4]² (moons within [-5, 5]²) and is built by name through
:data:`CLASSIC` (registered in ``psm.data.DATASETS``):

- ``8gaussians``: equal mixture of 8 Gaussians, means ``2√2 (cos kπ/4, sin kπ/4)``, variance
  1/8 (FFJORD's, with √2 for its 1.414). Exact density (a :class:`Mixture`).
- ``checkerboard``: uniform on the 8 dark 2×2 squares of a 4×4 board on [-4, 4]² (FFJORD's).
  Exact density (a :class:`Mixture` of boxes), entropy ``log 32``.
- ``rings``: 4 equal rings of radius 0.75, 1.5, 2.25, 3 with uniform angle, plus
  ``N(0, 0.08² I)`` (FFJORD's, with random instead of evenly spaced angles). Exact density
  (closed form with the Bessel function ``I0``).
- ``moons``: sklearn ``make_moons(noise=0.2) * 3 - 1`` (torchcfm's) with uniform instead of
  evenly spaced arc angles. Density by 1D quadrature (see below).
- ``spirals``: FFJORD's ``2spirals`` without its ``U[0, 1/6]²`` jitter:
  ``±(-t cos t, t sin t)/3 + N(0, 0.1² I)``, ``t = 3π√u``. Density by 1D quadrature.
- ``swissroll``: FFJORD's, ``(t cos t, t sin t)/5 + N(0, 0.2² I)``, ``t ~ U[1.5π, 4.5π]``.
  Density by 1D quadrature.
- ``pinwheel``: FFJORD's 5-arm pinwheel. No density (``has_density`` False): its map from
  Gaussian features folds over itself at large radii (caustics), so there is no closed form.

The curve sets (moons, spirals, swissroll) have the density
``p(x) = (1/K) Σ_k ∫ p(t) N(x; A_k c(t) + b_k, σ² I) dt``, a 1D integral of an analytic
function. It is evaluated by composite Gauss–Legendre quadrature in float64 whose error in
``log p`` is below 1e-9 on the data (checked against doubled panels in ``tests/test_data.py``),
i.e. far below float32 resolution.

:data:`ENTROPY`: checkerboard's is exact; the others were computed by a 2D midpoint rule on a
grid of spacing ≤ σ/2 (spectrally accurate for Gaussian-smoothed densities; halving the
spacing changes them by < 1e-7) and are rounded to 1e-5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Dataset
from .mixture import Mixture

Curve = Callable[[Tensor], Tensor]
"""``t [m] -> points [m, 2]`` (same device and dtype as ``t``)."""

# Differential entropies in nats (quadrature, see the module docstring; checkerboard is exact).
ENTROPY: dict[str, float] = {
    "8gaussians": 2.83158,
    "checkerboard": math.log(32.0),
    "rings": 2.62318,
    "moons": 3.87470,
    "spirals": 2.54062,
    "swissroll": 2.66965,
}


# ---------------------------------------------------------------------------------------------
# mixtures: 8gaussians, checkerboard


def eight_gaussians(*, center: bool = True) -> Mixture:
    """FFJORD's ``8gaussians``: ``(4 e_k + 0.5 z) / √2`` with ``e_k = (cos kπ/4, sin kπ/4)``.

    An equal mixture of 8 Gaussians with means ``2√2 e_k`` and variance ``1/8``; mean 0.

    Args:
        center: subtract the exact mean (0, so a no-op kept for a uniform interface).
    """
    radius = 4.0 / math.sqrt(2.0)
    comps = [
        {
            "kind": "gaussian",
            "weight": 1.0,
            "mean": [radius * math.cos(k * math.pi / 4), radius * math.sin(k * math.pi / 4)],
            "var": 0.125,
        }
        for k in range(8)
    ]
    return Mixture("8gaussians", comps, entropy=ENTROPY["8gaussians"], center=center)


def checkerboard(*, center: bool = True) -> Mixture:
    """FFJORD's ``checkerboard``: uniform on 8 of the 16 2×2 squares tiling [-4, 4]².

    Column ``i`` (x in ``[-4 + 2i, -2 + 2i]``) holds the squares with y in ``[0, 2]`` and
    ``[-4, -2]`` for even ``i``, ``[2, 4]`` and ``[-2, 0]`` for odd ``i``. Density 1/32 on
    them, entropy ``log 32``, mean 0.

    Args:
        center: subtract the exact mean (0).
    """
    comps = []
    for i in range(4):
        x_low = -4.0 + 2.0 * i
        for y_low in (0.0, -4.0) if i % 2 == 0 else (2.0, -2.0):
            comps.append(
                {
                    "kind": "box",
                    "weight": 1.0,
                    "low": [x_low, y_low],
                    "high": [x_low + 2.0, y_low + 2.0],
                }
            )
    return Mixture("checkerboard", comps, entropy=ENTROPY["checkerboard"], center=center)


# ---------------------------------------------------------------------------------------------
# rings (closed form)


class Rings(Dataset):
    """Equal mixture of noisy circles: ``r_k (cos θ, sin θ) + σ z``, θ ~ U[0, 2π), z ~ N(0, I).

    Exact density (``I0`` the modified Bessel function): with ``ρ = |x|``,
    ``p(x) = (1/K) Σ_k exp(-(ρ² + r_k²) / 2σ²) I0(r_k ρ / σ²) / (2πσ²)``. Mean 0.

    Args:
        radii: ring radii ``r_k``; FFJORD's ``rings`` uses 0.75, 1.5, 2.25, 3.
        sigma: noise standard deviation (FFJORD: 0.08).
        center: subtract the exact mean (0).
        entropy: known entropy in nats, if any.

    Attributes:
        shift: the subtracted mean ``[2]`` (float64; 0 here).
    """

    shape = (2,)

    def __init__(
        self,
        radii: Sequence[float] = (0.75, 1.5, 2.25, 3.0),
        sigma: float = 0.08,
        *,
        center: bool = True,
        entropy: float | None = None,
    ) -> None:
        self.name = "rings"
        self.entropy = entropy
        self.radii = torch.tensor(radii, dtype=torch.float64)
        self.sigma = float(sigma)
        self.shift = torch.zeros(2, dtype=torch.float64)  # the exact mean, by symmetry

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` points ``[n, 2]`` (float32) on ``generator.device``."""
        dev = generator.device
        radii = self.radii.to(device=dev, dtype=torch.float32)
        k = torch.randint(0, len(self.radii), (n,), generator=generator, device=dev)
        theta = 2.0 * math.pi * torch.rand(n, generator=generator, device=dev)
        z = torch.randn(n, 2, generator=generator, device=dev)
        ring = radii[k, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
        return ring + self.sigma * z

    @property
    def has_density(self) -> bool:
        return True

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of ``x [n, 2]`` → ``[n]`` (float64 inside)."""
        rho = x.detach().to(torch.float64).cpu().norm(dim=1, keepdim=True)  # [n, 1]
        s2 = self.sigma**2
        kappa = self.radii[None] * rho / s2  # [n, K]
        # exp(-(ρ² + r²)/2σ²) I0(κ) = exp(-(ρ - r)²/2σ²) i0e(κ)
        log_k = -((rho - self.radii[None]) ** 2) / (2 * s2) + torch.log(torch.special.i0e(kappa))
        out = torch.logsumexp(log_k, dim=1) - math.log(len(self.radii)) - math.log(2 * math.pi * s2)
        return out.to(device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------
# noisy curves (1D quadrature): moons, spirals, swissroll


def _gauss_legendre(panels: Tensor, nodes_per_panel: int) -> tuple[Tensor, Tensor]:
    """Composite Gauss–Legendre rule on consecutive panels.

    Args:
        panels: panel boundaries ``[P + 1]`` (increasing, float64).
        nodes_per_panel: Legendre nodes in each panel.

    Returns:
        ``(t [P * m], w [P * m])``: nodes and weights, float64.
    """
    xs, ws = np.polynomial.legendre.leggauss(nodes_per_panel)
    xs, ws = torch.from_numpy(xs), torch.from_numpy(ws)
    lo, hi = panels[:-1, None], panels[1:, None]
    t = 0.5 * (lo + hi) + 0.5 * (hi - lo) * xs[None]
    w = 0.5 * (hi - lo) * ws[None]
    return t.reshape(-1), w.reshape(-1)


class NoisyCurves(Dataset):
    """Equal-weight arms ``A_k c(t) + b_k`` of one parametric curve, plus Gaussian noise.

    ``x = A_k c(t) + b_k + σ z`` with ``k ~ U{0..K-1}``, ``t = F⁻¹(u)``, ``u ~ U[0, 1)``,
    ``z ~ N(0, I)``. The density ``(1/K) Σ_k ∫ p(t) N(x; A_k c(t) + b_k, σ² I) dt`` is
    evaluated by composite Gauss–Legendre quadrature in ``t`` (in log space, so it never
    underflows); the exact mean ``(1/K) Σ_k (A_k E[c(t)] + b_k)`` by the same rule.

    Args:
        name: the dataset's name.
        curve: ``c``, maps ``t [m]`` to ``[m, 2]`` with torch ops (any device/dtype).
        inv_cdf: ``F⁻¹``, maps ``u [m]`` in [0, 1) to ``t [m]``.
        log_pdf: ``log p(t)`` on the interior of the support, ``[m] -> [m]``.
        panels: quadrature panel boundaries over the support of ``t``, ``[P + 1]``.
        arms: ``(A_k [2, 2], b_k [2])`` per arm.
        sigma: noise standard deviation.
        nodes_per_panel: Legendre nodes per panel.
        entropy: known entropy in nats, if any.
        center: subtract the exact mean.

    Attributes:
        mean: the exact mean ``[2]`` (float64).
        shift: the subtracted mean ``[2]`` (``mean`` when centring, else 0).
        mass: the quadrature's total mass of ``p(t)``; 1 up to round-off (a self-check).
    """

    shape = (2,)

    def __init__(
        self,
        name: str,
        *,
        curve: Curve,
        inv_cdf: Callable[[Tensor], Tensor],
        log_pdf: Callable[[Tensor], Tensor],
        panels: Tensor,
        arms: Sequence[tuple[Sequence[Sequence[float]], Sequence[float]]],
        sigma: float,
        nodes_per_panel: int = 16,
        entropy: float | None = None,
        center: bool = True,
    ) -> None:
        self.name = name
        self.entropy = entropy
        self.sigma = float(sigma)
        self._curve, self._inv_cdf = curve, inv_cdf
        f64 = torch.float64
        self._a = torch.tensor([a for a, _ in arms], dtype=f64)  # [K, 2, 2]
        self._b = torch.tensor([b for _, b in arms], dtype=f64)  # [K, 2]
        t, w = _gauss_legendre(panels.to(f64), nodes_per_panel)
        log_w = torch.log(w) + log_pdf(t)  # [J]: quadrature weight × p(t)
        pts = curve(t)  # [J, 2]
        self._nodes = (torch.einsum("kij,nj->kni", self._a, pts) + self._b[:, None]).reshape(-1, 2)
        k = len(arms)
        self._log_w = log_w.repeat(k) - math.log(k) - math.log(2 * math.pi * self.sigma**2)
        self.mass = float(torch.exp(log_w).sum())  # ≈ 1: a check on log_pdf and the rule
        mean_curve = (torch.exp(log_w)[:, None] * pts).sum(0)
        mean = (torch.einsum("kij,j->ki", self._a, mean_curve) + self._b).mean(0)
        self.shift = mean if center else torch.zeros(2, dtype=f64)
        self.mean = mean

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` points ``[n, 2]`` (float32) on ``generator.device``; three draws per call."""
        dev, f32 = generator.device, torch.float32
        k = torch.randint(0, len(self._a), (n,), generator=generator, device=dev)
        u = torch.rand(n, generator=generator, device=dev)
        z = torch.randn(n, 2, generator=generator, device=dev)
        a, b = self._a.to(dev, f32), (self._b - self.shift).to(dev, f32)
        on_curve = torch.einsum("nij,nj->ni", a[k], self._curve(self._inv_cdf(u)))
        return on_curve + b[k] + self.sigma * z

    @property
    def has_density(self) -> bool:
        return True

    def log_prob(self, x: Tensor, chunk: int = 4096) -> Tensor:
        """Log-density of centred points ``x [n, 2]`` → ``[n]`` (float64 inside).

        Args:
            x: points ``[n, 2]``, in the (possibly centred) coordinates ``sample`` returns.
            chunk: points per block of the ``[chunk, K·J]`` distance matrix.
        """
        xd = x.detach().to(torch.float64).cpu() + self.shift
        # -|x - m_j|²/2σ² = x·m_j/σ² - |m_j|²/2σ² - |x|²/2σ²: one small matmul per chunk
        s2 = self.sigma**2
        weight = self._nodes.T / s2  # [2, K·J]
        bias = self._log_w - (self._nodes**2).sum(1) / (2 * s2)  # [K·J]
        out = [
            torch.logsumexp(torch.addmm(bias, xc, weight), dim=1) - (xc**2).sum(1) / (2 * s2)
            for xc in xd.split(chunk)
        ]
        lp = torch.cat(out) if out else xd.new_zeros(0)
        return lp.to(device=x.device, dtype=x.dtype)


def _circle(t: Tensor) -> Tensor:
    """Unit circle ``(cos t, sin t)``, ``[m] -> [m, 2]``."""
    return torch.stack([torch.cos(t), torch.sin(t)], dim=1)


def moons(*, center: bool = True, sigma: float = 0.6, panels: int = 12) -> NoisyCurves:
    """torchcfm's ``moons``: ``3 m - 1`` for sklearn ``make_moons(noise=0.2)`` point ``m``.

    With uniform angles ``t ~ U[0, π)`` instead of sklearn's even grid: half the points are
    ``3 (cos t, sin t) - 1``, half ``-3 (cos t, sin t) + (2, 0.5)``, each plus
    ``N(0, σ² I)`` with ``σ = 0.6``. Exact mean ``(0.5, -0.25)``.

    Args:
        center: subtract the exact mean.
        sigma: noise standard deviation in data units (0.6 = sklearn's 0.2 × 3).
        panels: quadrature panels (16 Legendre nodes each).
    """
    return NoisyCurves(
        "moons",
        curve=_circle,
        inv_cdf=lambda u: math.pi * u,
        log_pdf=lambda t: torch.full_like(t, -math.log(math.pi)),
        panels=torch.linspace(0.0, math.pi, panels + 1, dtype=torch.float64),
        arms=[([[3.0, 0.0], [0.0, 3.0]], [-1.0, -1.0]), ([[-3.0, 0.0], [0.0, -3.0]], [2.0, 0.5])],
        sigma=sigma,
        entropy=ENTROPY["moons"] if sigma == 0.6 else None,
        center=center,
    )


def _spiral(t: Tensor) -> Tensor:
    """FFJORD's spiral arm ``(-t cos t, t sin t) / 3``, ``[m] -> [m, 2]``."""
    return torch.stack([-t * torch.cos(t), t * torch.sin(t)], dim=1) / 3.0


def spirals(*, center: bool = True, sigma: float = 0.1, panels: int = 64) -> NoisyCurves:
    """Two-arm spiral (FFJORD's ``2spirals`` without its ``U[0, 1/6]²`` jitter).

    ``t = 3π √u`` (density ``2t / (3π)²`` on [0, 3π], 1.5 turns), a point is
    ``±(-t cos t, t sin t) / 3 + N(0, σ² I)`` with either sign equally likely, ``σ = 0.1``.
    Exact mean 0. Quadrature panels have equal ``u``-mass, which matches their width to the
    integrand's (∝ 1/t).

    Args:
        center: subtract the exact mean (0).
        sigma: noise standard deviation.
        panels: quadrature panels (16 Legendre nodes each).
    """
    t_max = 3.0 * math.pi
    return NoisyCurves(
        "spirals",
        curve=_spiral,
        inv_cdf=lambda u: t_max * torch.sqrt(u),
        log_pdf=lambda t: torch.log(2.0 * t / t_max**2),
        panels=t_max * torch.linspace(0.0, 1.0, panels + 1, dtype=torch.float64).sqrt(),
        arms=[([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0]), ([[-1.0, 0.0], [0.0, -1.0]], [0.0, 0.0])],
        sigma=sigma,
        entropy=ENTROPY["spirals"] if sigma == 0.1 else None,
        center=center,
    )


def swissroll(*, center: bool = True, sigma: float = 0.2, panels: int = 40) -> NoisyCurves:
    """FFJORD's ``swissroll``: sklearn ``make_swiss_roll(noise=1)[:, [0, 2]] / 5``.

    ``t ~ U[1.5π, 4.5π]``, a point is ``(t cos t, t sin t) / 5 + N(0, σ² I)``, ``σ = 0.2``.
    Exact mean ``(2/5, 2/(15π)) ≈ (0.4, 0.0424)``.

    Args:
        center: subtract the exact mean.
        sigma: noise standard deviation.
        panels: quadrature panels (16 Legendre nodes each).
    """
    lo, hi = 1.5 * math.pi, 4.5 * math.pi
    # panel widths ∝ 1/|c'(t)| ≈ 1/t, the integrand's width: equal steps in t²
    edges = torch.linspace(lo**2, hi**2, panels + 1, dtype=torch.float64).sqrt()
    return NoisyCurves(
        "swissroll",
        curve=lambda t: torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / 5.0,
        inv_cdf=lambda u: lo + (hi - lo) * u,
        log_pdf=lambda t: torch.full_like(t, -math.log(hi - lo)),
        panels=edges,
        arms=[([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])],
        sigma=sigma,
        entropy=ENTROPY["swissroll"] if sigma == 0.2 else None,
        center=center,
    )


# ---------------------------------------------------------------------------------------------
# pinwheel (no density)


class Pinwheel(Dataset):
    """FFJORD's ``pinwheel``: 5 curved arms, no exact density.

    ``f = (1 + 0.3 z₀, 0.1 z₁)``, arm ``k ~ U{0..4}``, angle ``θ = 2πk/5 + 0.25 exp(f₀)``,
    point ``2 Rot(-θ) f``. Mean 0 (5-fold rotational symmetry). The map ``f -> x`` folds
    over itself for ``|f| ≳ 1.95`` (caustics with infinite density), so no usable closed
    form exists and ``has_density`` is False.

    Args:
        center: subtract the exact mean (0).
        arms: number of arms.
        radial_std: std of the radial feature ``f₀`` (around 1).
        tangential_std: std of the tangential feature ``f₁``.
        rate: how fast the angle grows with ``exp(f₀)``.
    """

    shape = (2,)

    def __init__(
        self,
        *,
        center: bool = True,
        arms: int = 5,
        radial_std: float = 0.3,
        tangential_std: float = 0.1,
        rate: float = 0.25,
    ) -> None:
        self.name = "pinwheel"
        self.arms, self.rate = arms, rate
        self.stds = (radial_std, tangential_std)
        self.shift = torch.zeros(2, dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` points ``[n, 2]`` (float32) on ``generator.device``."""
        dev = generator.device
        z = torch.randn(n, 2, generator=generator, device=dev)
        k = torch.randint(0, self.arms, (n,), generator=generator, device=dev)
        f0 = 1.0 + self.stds[0] * z[:, 0]
        f1 = self.stds[1] * z[:, 1]
        theta = 2.0 * math.pi * k / self.arms + self.rate * torch.exp(f0)
        c, s = torch.cos(theta), torch.sin(theta)
        return 2.0 * torch.stack([f0 * c + f1 * s, -f0 * s + f1 * c], dim=1)


# ---------------------------------------------------------------------------------------------
# registry


def rings(*, center: bool = True) -> Rings:
    """FFJORD's ``rings`` with uniform random angles: see :class:`Rings`."""
    return Rings(center=center, entropy=ENTROPY["rings"])


def pinwheel(*, center: bool = True) -> Pinwheel:
    """FFJORD's ``pinwheel``: see :class:`Pinwheel`."""
    return Pinwheel(center=center)


CLASSIC: dict[str, Callable[..., Dataset]] = {
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "moons": moons,
    "pinwheel": pinwheel,
    "rings": rings,
    "spirals": spirals,
    "swissroll": swissroll,
}
"""Name -> builder ``(center=...) -> Dataset`` for every classic set."""
