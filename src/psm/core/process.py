"""Forward processes: Gaussian paths ``x_t = α_t x0 + σ_t ε`` (data at t=0, noise at t=1).

A :class:`Schedule` gives the path coefficients at time t; a :class:`Process` pairs a schedule
with what the network predicts (ε for the paper's VP/DDPM setting, the velocity for OT flow
matching, appendix F) and turns a network output into everything the rest of psm needs:

* training: ``x_t`` and the regression target for a batch (paper eq. 26 / Algorithm 1);
* inference: the probability-flow ODE field ``f(x, t)`` (eq. 30), the score, and the reverse-SDE
  drift and diffusion (eq. 7).

Generic identities used below, for any path with coefficients (α, σ) and derivatives (α', σ'):

* forward SDE ``dx = (α'/α) x dt + g dW`` with ``g² = 2σσ' - 2(α'/α)σ²``;
* probability-flow ODE ``f(x, t) = (α'/α) x - ½ g² ∇log p_t(x)`` (eq. 30 for VP);
* ``∇log p_t(x) = -E[ε | x_t = x] / σ_t``; the velocity ``E[α' x0 + σ' ε | x_t = x]`` equals f.

For VP with ``b(t) = b_min + (b_max - b_min) t`` these give ``g² = b(t)`` and
``f = -½ b(t) (x + s(x, t))`` exactly as in the paper.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..spec import Builders

Prediction = Literal["epsilon", "velocity", "x0", "v", "score"]
PREDICTIONS: tuple[str, ...] = ("epsilon", "velocity", "x0", "v", "score")
"""What a network may predict: ``epsilon`` (ε, eq. 26), ``velocity`` (the probability-flow field
``α' x0 + σ' ε``, flow matching), ``x0`` (the clean point), ``v`` (Salimans & Ho 2022:
``v = α_t ε − σ_t x0``) and ``score`` (``∇log p_t = −ε/σ_t`` itself, whose target ``−ε/σ_t``
is the conditional score of denoising score matching). Each is an affine function of ε given ``x_t``
(:meth:`Process.epsilon_affine`), so all four give the same score, field and likelihood when
they predict exactly."""


@dataclass(frozen=True)
class PathCoefficients:
    """Coefficients of ``x_t = α_t x0 + σ_t ε`` at a batch of times, each of the shape of ``t``.

    Attributes:
        alpha: α_t.
        sigma: σ_t.
        d_alpha: dα/dt.
        d_sigma: dσ/dt.
        g2: squared diffusion ``g(t)²`` of the forward SDE with these marginals.
    """

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor
    g2: Tensor


class Schedule(ABC):
    """Maps times ``t`` (any shape) to :class:`PathCoefficients` of the same shape."""

    @abstractmethod
    def __call__(self, t: Tensor) -> PathCoefficients: ...

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Only ``(α_t, σ_t)``: what an ε-prediction training batch needs (a hot path)."""
        c = self(t)
        return c.alpha, c.sigma


@dataclass(frozen=True)
class VPSchedule(Schedule):
    """Variance-preserving schedule with linear ``b(t) = b_min + (b_max - b_min) t`` (eqs. 28-29).

    ``α_t = exp(-½ ∫₀ᵗ b)``, ``σ_t² = 1 - exp(-∫₀ᵗ b)``, computed with ``expm1`` so that σ stays
    accurate in float32 near t = 0. The paper's default is ``b(t) = 10 t``.
    """

    b_min: float = 0.0
    b_max: float = 10.0

    def beta(self, t: Tensor) -> Tensor:
        """``b(t)``, the shape of ``t``."""
        return self.b_min + (self.b_max - self.b_min) * t

    def integral(self, t: Tensor) -> Tensor:
        """``∫₀ᵗ b(s) ds = t (b_min + ½ (b_max - b_min) t)``, the shape of ``t``."""
        return t * (0.5 * (self.b_max - self.b_min) * t + self.b_min)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        big_b = self.integral(t)
        return torch.exp(-0.5 * big_b), torch.sqrt(-torch.expm1(-big_b))

    def __call__(self, t: Tensor) -> PathCoefficients:
        big_b = self.integral(t)
        b = self.beta(t)
        alpha = torch.exp(-0.5 * big_b)
        sigma2 = -torch.expm1(-big_b)
        sigma = torch.sqrt(sigma2)
        # σ σ' = ½ b exp(-B)  =>  σ' = b α² / (2σ)
        d_sigma = b * alpha * alpha / (2.0 * sigma)
        return PathCoefficients(alpha, sigma, -0.5 * b * alpha, d_sigma, b)


@dataclass(frozen=True)
class OTSchedule(Schedule):
    """Optimal-transport flow-matching path ``x_t = (1 - (1 - σ_min) t) x0 + t ε`` (appendix F)."""

    sigma_min: float = 1e-4

    def __call__(self, t: Tensor) -> PathCoefficients:
        c = 1.0 - self.sigma_min
        alpha = 1.0 - c * t
        sigma = t
        d_alpha = torch.full_like(t, -c)
        d_sigma = torch.ones_like(t)
        # g² = 2σσ' - 2(α'/α)σ² = 2t + 2c t² / (1 - c t)
        g2 = 2.0 * t + 2.0 * c * t * t / alpha
        return PathCoefficients(alpha, sigma, d_alpha, d_sigma, g2)


def _per_sample(c: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample coefficients ``[B]`` (or a scalar) to broadcast against ``x [B, ...]``."""
    if c.dim() == 0:
        return c
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))


class Process:
    """A forward process: a schedule plus what the network predicts.

    Args:
        schedule: the path coefficients.
        prediction: ``"epsilon"`` (network output ε̂, loss ‖ε̂ - ε‖², eq. 26), ``"velocity"``
            (network output v̂, loss ‖v̂ - (α' x0 + σ' ε)‖², flow matching), ``"x0"`` (output
            x̂0, loss ‖x̂0 - x0‖²), ``"v"`` (output v̂, loss ‖v̂ - (α ε - σ x0)‖²) or ``"score"``
            (output ŝ, loss ‖ŝ + ε/σ‖²).
        name: the config name of this process (``"vp"`` or ``"ot"``).

    The smallest time used, t0, belongs to the time domain the blocks split
    (:class:`psm.core.partition.Partition`), not to the process.
    """

    def __init__(self, schedule: Schedule, prediction: Prediction, *, name: str = "") -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}")
        self.schedule = schedule
        self.prediction: Prediction = prediction
        self.name = name

    def __repr__(self) -> str:
        return f"Process({self.schedule!r}, prediction={self.prediction!r})"

    def with_prediction(self, prediction: Prediction) -> Process:
        """The same path read with another network parametrization."""
        return Process(self.schedule, prediction, name=self.name)

    # ---------------------------------------------------------------- training
    def training_pair(self, x0: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Noisy input and regression target for one batch (eq. 29; Algorithm 1).

        Args:
            x0: data, ``[B, *D]``.
            t: times, ``[B]``.
            noise: ε ~ N(0, I), ``[B, *D]``.

        Returns:
            ``(x_t, target)``, both ``[B, *D]``. The times, the noise and how the regression is
            weighted belong to the block's :class:`~psm.core.objective.Objective`.
        """
        if self.prediction == "epsilon":
            alpha, sigma = self.schedule.alpha_sigma(t)
            return torch.addcmul(_per_sample(alpha, x0) * x0, _per_sample(sigma, x0), noise), noise
        if self.prediction in ("x0", "v", "score"):
            alpha, sigma = self.schedule.alpha_sigma(t)
            a, s = _per_sample(alpha, x0), _per_sample(sigma, x0)
            x_t = torch.addcmul(a * x0, s, noise)
            if self.prediction == "score":
                return x_t, -noise / s
            return x_t, (x0 if self.prediction == "x0" else a * noise - s * x0)
        c = self.schedule(t)
        x_t = torch.addcmul(_per_sample(c.alpha, x0) * x0, _per_sample(c.sigma, x0), noise)
        return x_t, _per_sample(c.d_alpha, x0) * x0 + _per_sample(c.d_sigma, x0) * noise

    # ---------------------------------------------------------------- inference
    def epsilon_affine(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(A, C)`` with ``ε = A x_t + C · output`` for this prediction, each the shape of t.

        * ε: ``A = 0, C = 1``;
        * x0: ``x_t = α x0 + σ ε`` gives ``A = 1/σ, C = -α/σ``;
        * v = α ε - σ x0: ``σ x_t + α v = (α² + σ²) ε`` gives ``A = σ/(α²+σ²), C = α/(α²+σ²)``;
        * score ``s = -ε/σ``: ``A = 0, C = -σ``;
        * velocity ``f = (α'/α) x + k ε`` with ``k = ½ g²/σ`` (eq. 30): ``A = -(α'/α)/k, C = 1/k``.

        ``C`` also turns an output error into an ε error (``ε̂ - ε = C (out - target)``), which
        is how a likelihood weighting carries over between predictions.
        """
        if self.prediction == "epsilon":
            return torch.zeros_like(t), torch.ones_like(t)
        if self.prediction == "x0":
            alpha, sigma = self.schedule.alpha_sigma(t)
            return 1.0 / sigma, -alpha / sigma
        if self.prediction == "v":
            alpha, sigma = self.schedule.alpha_sigma(t)
            norm = alpha * alpha + sigma * sigma
            return sigma / norm, alpha / norm
        if self.prediction == "score":
            sigma = self.schedule.alpha_sigma(t)[1]
            return torch.zeros_like(t), -sigma
        c = self.schedule(t)
        k = 0.5 * c.g2 / c.sigma
        return -(c.d_alpha / c.alpha) / k, 1.0 / k

    def from_epsilon(self, eps: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The output this prediction gives for ``E[ε | x_t = x] = eps`` (inverse of
        :meth:`epsilon`), ``[B, *D]``."""
        if self.prediction == "epsilon":
            return eps
        a, c = self.epsilon_affine(t)
        return (eps - _per_sample(a, x) * x) / _per_sample(c, x)

    def epsilon(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """E[ε | x_t = x] from a network output, ``[B, *D]``."""
        if self.prediction == "epsilon":
            return output
        if self.prediction in ("x0", "v", "score"):
            a, c = self.epsilon_affine(t)
            return _per_sample(a, x) * x + _per_sample(c, x) * output
        c = self.schedule(t)
        dlog_alpha = c.d_alpha / c.alpha
        # v = (α'/α) x + (σ' - (α'/α) σ) ε
        scale = c.d_sigma - dlog_alpha * c.sigma
        return (output - _per_sample(dlog_alpha, x) * x) / _per_sample(scale, x)

    def score(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """``∇ log p_t(x) = -E[ε | x] / σ_t`` from a network output, ``[B, *D]``."""
        return -self.epsilon(output, x, t) / _per_sample(self.schedule(t).sigma, x)

    def velocity(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Probability-flow ODE field ``f(x, t)`` (eq. 30) from a network output, ``[B, *D]``.

        For ε-prediction ``f = (α'/α) x + ½ g² ε̂ / σ``, i.e. ``-½ b(t) (x - ε̂/σ_t)`` for VP.
        """
        if self.prediction == "velocity":
            return output
        a, c = self.field_coefficients(t)
        return _per_sample(a, x) * x + _per_sample(c, x) * output

    def field_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(a, c)`` with ``f(x, t) = a x + c · output``: the field is affine in the output.

        ε-prediction: ``a = α'/α``, ``c = ½ g² / σ``; velocity prediction: ``a = 0``, ``c = 1``;
        x0 and v through :meth:`epsilon_affine` (``ε = A x + C out``): ``a = α'/α + ½ g²/σ A``,
        ``c = ½ g²/σ C``. All have the shape of ``t``.
        """
        if self.prediction == "velocity":
            return torch.zeros_like(t), torch.ones_like(t)
        k = self.schedule(t)
        if self.prediction in ("x0", "v", "score"):
            big_a, big_c = self.epsilon_affine(t)
            kk = 0.5 * k.g2 / k.sigma
            return k.d_alpha / k.alpha + kk * big_a, kk * big_c
        return k.d_alpha / k.alpha, 0.5 * k.g2 / k.sigma

    def reverse_sde(self, output: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Drift and diffusion of the reverse-time SDE (eq. 7), to be integrated from 1 to t0.

        ``dx = [(α'/α) x - g² ∇log p_t(x)] dt + g dW̄``; for VP ``-b(t) [½ x + s] dt + √b dW̄``.

        Returns:
            ``(drift [B, *D], g [B] or scalar)``.
        """
        c = self.schedule(t)
        drift = _per_sample(c.d_alpha / c.alpha, x) * x - _per_sample(c.g2, x) * self.score(
            output, x, t
        )
        return drift, torch.sqrt(c.g2)

    @staticmethod
    def prior_log_prob(x: Tensor) -> Tensor:
        """``log N(x; 0, I)`` per sample, ``[B]``: the t=1 end of the likelihood (eq. 4)."""
        d = x[0].numel()
        return -0.5 * x.flatten(1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi)


PROCESSES: Builders[Callable[..., Process]] = Builders("process")
"""The forward processes by config name (``process.name``). A builder takes the fields of the
``process:`` section as keywords (``b_min``, ``b_max``, ``sigma_min``, ``prediction``) and uses
the ones it needs; a new process is one builder and its ``@PROCESSES.register`` line."""


@PROCESSES.register("vp")
def _vp(*, b_min: float, b_max: float, prediction: Prediction | None, **_: object) -> Process:
    """The paper's VP (DDPM) process, ε-prediction by default."""
    return Process(VPSchedule(b_min, b_max), prediction or "epsilon", name="vp")


@PROCESSES.register("ot")
def _ot(*, sigma_min: float, prediction: Prediction | None, **_: object) -> Process:
    """The OT path of flow matching (appendix F), velocity prediction by default."""
    return Process(OTSchedule(sigma_min), prediction or "velocity", name="ot")


def make_process(
    name: str,
    *,
    b_min: float = 0.0,
    b_max: float = 10.0,
    sigma_min: float = 1e-4,
    prediction: Prediction | None = None,
) -> Process:
    """Build a process by its config name (a name of :data:`PROCESSES`).

    Args:
        name: ``"vp"`` (paper default, ε-prediction) or ``"ot"`` (flow matching, velocity).
        b_min, b_max: VP ``b(t)`` endpoints.
        sigma_min: OT path noise floor.
        prediction: override what the network predicts; defaults to the process's own.

    Raises:
        ValueError: an unknown name, in one line.
    """
    build = PROCESSES.get(name)
    return build(b_min=b_min, b_max=b_max, sigma_min=sigma_min, prediction=prediction)


PROCESS_NAMES: tuple[str, ...] = tuple(PROCESSES.names())  # psm's own; PROCESSES is the registry
