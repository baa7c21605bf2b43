"""Finite mixtures of Gaussians and (rotated) uniform boxes with exact log-density.

This is the format of the paper's TY and HG sets (``toy2d.json``, shipped with the package):
a component is picked with probability ``weight / sum(weights)``; a ``gaussian`` component
draws ``mean + sqrt(var) N(0, I)``, a ``box`` component draws ``u ~ U([low, high])`` and returns
``Rot(rotation_deg) @ u - offset``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import torch
from torch import Tensor

from .base import DataError, Dataset


class Mixture(Dataset):
    """A 2D mixture of Gaussian and box components.

    Args:
        name: the dataset's name.
        components: dicts as in ``toy2d.json``.
        entropy: known entropy in nats, if any.
        center: subtract the mixture's exact mean (the paper centres TY and HG; a shift changes
            no NLL).
    """

    shape = (2,)

    def __init__(
        self,
        name: str,
        components: Sequence[Mapping[str, Any]],
        *,
        entropy: float | None = None,
        center: bool = False,
    ) -> None:
        if not components:
            raise DataError(f"mixture {name!r} has no components")
        self.name = name
        self.entropy = entropy
        w = torch.tensor([float(c["weight"]) for c in components], dtype=torch.float64)
        self._weights = w / w.sum()
        k = len(components)
        self._is_box = torch.tensor([c["kind"] == "box" for c in components])
        mean = torch.zeros(k, 2, dtype=torch.float64)
        std = torch.ones(k, dtype=torch.float64)
        low = torch.zeros(k, 2, dtype=torch.float64)
        high = torch.ones(k, 2, dtype=torch.float64)
        rot = torch.eye(2, dtype=torch.float64).repeat(k, 1, 1)
        offset = torch.zeros(k, 2, dtype=torch.float64)
        for i, c in enumerate(components):
            if float(c["weight"]) <= 0:
                raise DataError(f"mixture {name!r}: component {i} has weight <= 0")
            if c["kind"] == "gaussian":
                if float(c["var"]) <= 0:
                    raise DataError(f"mixture {name!r}: component {i} has var <= 0")
                mean[i] = torch.tensor(c["mean"], dtype=torch.float64)
                std[i] = math.sqrt(float(c["var"]))
            elif c["kind"] == "box":
                low[i] = torch.tensor(c["low"], dtype=torch.float64)
                high[i] = torch.tensor(c["high"], dtype=torch.float64)
                if bool((high[i] <= low[i]).any()):
                    raise DataError(f"mixture {name!r}: component {i} has high <= low")
                a = math.radians(float(c.get("rotation_deg", 0.0)))
                rot[i] = torch.tensor(
                    [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64
                )
                offset[i] = torch.tensor(c.get("offset", [0.0, 0.0]), dtype=torch.float64)
            else:
                raise DataError(f"mixture {name!r}: unknown component kind {c['kind']!r}")
        # exact component means, for centring
        box_mean = torch.einsum("kij,kj->ki", rot, 0.5 * (low + high)) - offset
        comp_mean = torch.where(self._is_box[:, None], box_mean, mean)
        self.shift = (self._weights[:, None] * comp_mean).sum(0) if center else torch.zeros(2)
        self.shift = self.shift.to(torch.float64)
        self._mean, self._std = mean, std
        self._low, self._high, self._rot, self._offset = low, high, rot, offset
        self._log_area = torch.log((high - low).prod(1))
        self._cache: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def _affine(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per component, ``point = loc + mat @ v`` with ``v ~ N(0, I)`` (gaussian) or
        ``v ~ U[0, 1]²`` (box): float32 ``(cdf [k-1], is_box [k], loc [k, 2], mat [k, 2, 2])``
        on ``device``, centred, cached; ``cdf`` holds the inner edges of the weights' CDF."""
        if device not in self._cache:
            eye = torch.eye(2, dtype=torch.float64)
            box_mat = self._rot * (self._high - self._low)[:, None, :]  # R diag(width)
            box_loc = torch.einsum("kij,kj->ki", self._rot, self._low) - self._offset
            is_box = self._is_box
            mat = torch.where(is_box[:, None, None], box_mat, self._std[:, None, None] * eye)
            loc = torch.where(is_box[:, None], box_loc, self._mean) - self.shift
            f = torch.float32
            cdf = torch.cumsum(self._weights, 0)
            cdf = (cdf / cdf[-1])[:-1]  # inner edges: component = number of edges below u
            self._cache[device] = (
                cdf.to(device, f), is_box.to(device), loc.to(device, f), mat.to(device, f),
            )  # fmt: skip
        return self._cache[device]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` points ``[n, 2]``; three random draws from ``generator`` per call."""
        cdf, is_box, loc, mat = self._affine(generator.device)
        if n == 0:
            return torch.empty(0, 2, device=generator.device)
        # component by inverse CDF (one uniform per point; cheaper than torch.multinomial)
        pick = torch.rand(n, generator=generator, device=generator.device)
        comp = torch.searchsorted(cdf, pick, right=True)
        z = torch.randn(n, 2, generator=generator, device=generator.device)
        u = torch.rand(n, 2, generator=generator, device=generator.device)
        # index_select: the same gathers as ``loc[comp]`` etc., without advanced indexing's cost
        v = torch.where(is_box.index_select(0, comp)[:, None], u, z)
        loc_n, mat_n = loc.index_select(0, comp)[:, :, None], mat.index_select(0, comp)
        return torch.baddbmm(loc_n, mat_n, v[:, :, None]).squeeze(-1)

    @property
    def has_density(self) -> bool:
        return True

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of centred points ``x [n, 2]`` → ``[n]`` (float64 inside)."""
        xd = x.detach().to(torch.float64).cpu() + self.shift
        lw = torch.log(self._weights)
        diff = xd[:, None, :] - self._mean[None]
        var = self._std**2
        log_gauss = -0.5 * diff.pow(2).sum(-1) / var - torch.log(2 * math.pi * var)
        u = torch.einsum("kji,nkj->nki", self._rot, xd[:, None, :] + self._offset[None])
        # float32 points exactly on an edge may round just outside the float64 bounds
        tol = 1e-6
        inside = ((u >= self._low - tol) & (u <= self._high + tol)).all(-1)
        log_box = torch.where(inside, -self._log_area, torch.tensor(-math.inf, dtype=torch.float64))
        per_comp = lw + torch.where(self._is_box[None], log_box, log_gauss)
        return torch.logsumexp(per_comp, dim=1).to(device=x.device, dtype=x.dtype)

    def marginal_log_prob(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """Exact log-density of ``x_t = α x0 + σ ε`` (x0 from this mixture, centred) at points
        ``x [n, 2]`` → ``[n]`` float64: a Gaussian component becomes ``N(α m, α² v + σ²)``, a box
        the box blurred by ``N(0, σ²)`` along its own axes (a product of normal-CDF differences).

        ``E_data[-log p_t(x0)]`` at ``t = t0`` is the floor of a likelihood that starts at t0
        (a model can at best learn ``p_{t0}``); at ``σ → 0`` it is the entropy.
        """
        if sigma <= 0:
            return self.log_prob(x).to(torch.float64)
        return self._marginal_log_prob(x.detach().to(torch.float64).cpu(), alpha, sigma)

    def marginal_score(
        self, x: Tensor, alpha: float, sigma: float, *, differentiable: bool = False
    ) -> Tensor:
        """Exact score ``∇ log p_t(x)`` of ``x_t = α x0 + σ ε`` at points ``x [n, 2]`` →
        ``[n, 2]`` float64 (autograd through :meth:`marginal_log_prob`'s closed form; σ > 0).

        ``differentiable``: keep the graph from ``x`` (CPU) to the score, so a caller can take
        the score's Jacobian (the exact trace of a likelihood); else ``x`` is detached."""
        if sigma <= 0:
            raise ValueError("the score of the data themselves (sigma = 0) is not defined here")
        with torch.enable_grad():
            if differentiable and x.requires_grad:
                xd = x.to(torch.float64)
            else:
                xd = x.detach().to(torch.float64).cpu().requires_grad_(True)
            (score,) = torch.autograd.grad(
                self._marginal_log_prob(xd, alpha, sigma).sum(), xd, create_graph=differentiable
            )
        return score

    def _marginal_log_prob(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        xd = x + alpha * self.shift
        lw = torch.log(self._weights)
        var = alpha**2 * self._std**2 + sigma**2
        diff = xd[:, None, :] - alpha * self._mean[None]
        log_gauss = -0.5 * diff.pow(2).sum(-1) / var - torch.log(2 * math.pi * var)
        z = torch.einsum("kji,nkj->nki", self._rot, xd[:, None, :] + alpha * self._offset[None])
        hi = (z - alpha * self._low) / sigma  # Φ(hi) - Φ(lo) per axis
        lo = (z - alpha * self._high) / sigma
        upper = lo > 0  # both in the upper tail: use Φ(-lo) - Φ(-hi) instead
        a = torch.where(upper, -lo, hi)
        b = torch.where(upper, -hi, lo)
        la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
        log_diff = la + torch.log1p(-torch.exp((lb - la).clamp(max=0.0)).clamp(max=1 - 1e-300))
        width = alpha * (self._high - self._low)
        log_box = (log_diff - torch.log(width)).sum(-1)
        per_comp = lw + torch.where(self._is_box[None], log_box, log_gauss)
        return torch.logsumexp(per_comp, dim=1)


def load_paper_spec() -> dict[str, Any]:
    """The paper's TY and HG specification shipped as ``psm/data/toy2d.json``."""
    text = resources.files("psm.data").joinpath("toy2d.json").read_text()
    return json.loads(text)


def paper_toy(name: str, *, center: bool = True) -> Mixture:
    """TY or HG exactly as in ``toy2d.json``, with its true entropy."""
    spec = load_paper_spec()["datasets"][name.upper()]
    return Mixture(
        name.lower(), spec["components"], entropy=float(spec["entropy_nats"]), center=center
    )
