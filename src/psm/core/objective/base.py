"""The objective seam: a batch, the :class:`Objective` base and its config spec."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ...spec import Spec
from ..process import Process


@dataclass(frozen=True)
class Batch:
    """One block's training batch, or K blocks' stacked (:func:`stack_batches`).

    Attributes:
        x_t: noisy inputs ``α_t x0 + σ_t ε`` (eq. 29), ``[B, *D]`` (stacked ``[K, B, *D]``).
        t: times, ``[B]`` (``[K, B]``).
        target: the regression target (ε, or the velocity ``α' x0 + σ' ε``), like ``x_t``.
        weight: per-sample loss weight, ``[B]`` (``[K, B]``); None for an unweighted loss.
    """

    x_t: Tensor
    t: Tensor
    target: Tensor
    weight: Tensor | None = None


def stack_batches(batches: Sequence[Batch]) -> Batch:
    """K blocks' batches as one: every field gains a leading ``[K]`` axis (views for K = 1).

    The weight stays None when no block has one; a block without one among weighted blocks
    gets ones (exact: ``1 · x = x``).
    """
    weights = [b.weight for b in batches]
    weight = None
    if any(w is not None for w in weights):
        weight = _stacked(
            [w if w is not None else torch.ones_like(b.t) for w, b in zip(weights, batches)]
        )
    return Batch(
        _stacked([b.x_t for b in batches]),
        _stacked([b.t for b in batches]),
        _stacked([b.target for b in batches]),
        weight,
    )


def _stacked(values: Sequence[Tensor]) -> Tensor:
    """``[K, ...]`` from K tensors (a view for K = 1)."""
    return values[0].unsqueeze(0) if len(values) == 1 else torch.stack(list(values))


class Objective(ABC):
    """What one block learns from: times within its range, the pair, and the loss weights.

    Args:
        process: the run's forward process (path and prediction).
        t_lo, t_hi: the block's training times, ``t_lo <= t_hi`` (equal for a DPSM grid point).

    Subclasses implement :meth:`times`; :meth:`draw` and :meth:`loss` are shared.
    """

    def __init__(self, process: Process, t_lo: float, t_hi: float) -> None:
        if not 0.0 <= t_lo <= t_hi <= 1.0:
            raise ValueError(f"a block's times need 0 <= t_lo <= t_hi <= 1, got [{t_lo}, {t_hi}]")
        self.process = process
        self.t_lo, self.t_hi = float(t_lo), float(t_hi)

    def __repr__(self) -> str:
        return f"{type(self).__name__}([{self.t_lo:.6g}, {self.t_hi:.6g}], {self.process!r})"

    @abstractmethod
    def times(
        self, n: int, generator: torch.Generator, device: torch.device
    ) -> tuple[Tensor, Tensor | None]:
        """``n`` training times within ``[t_lo, t_hi]`` and their loss weights.

        Args:
            n: the batch size B.
            generator: the block's data stream (every random number comes from it).
            device: where the batch lives (the generator's device).

        Returns:
            ``(t [n], weight [n] or None)``.
        """

    def draw(self, x0: Tensor, generator: torch.Generator) -> Batch:
        """One batch for data ``x0`` (Algorithm 1/2): times, noise, pair (eq. 29), weights.

        Random numbers are drawn in this order from ``generator`` — the times, then
        ``ε ~ N(0, I)`` — after the caller drew ``x0`` from it, so a block's batches are a pure
        function of its seed.

        Args:
            x0: data, ``[B, *D]``, on the generator's device.
            generator: the block's data stream.

        Returns:
            The :class:`Batch`, ``x_t``/``target`` ``[B, *D]``, ``t``/``weight`` ``[B]``.
        """
        t, weight = self.times(x0.shape[0], generator, x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        x_t, target = self.process.training_pair(x0, t, noise)
        return Batch(x_t, t, target, weight)

    def loss(self, output: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        """Mean (weighted) squared error per block (eq. 26; Algorithm 1): ``[K, B, *D] -> [K]``.

        Called once for a stack of K blocks (K = 1 for a block alone). The mean runs over each
        block's batch and dimensions; the trainer sums the K values, so each block's gradient
        is exactly that of its own loss. With weights ``w [K, B]`` it is
        ``mean_b w_b · mean_d (output - target)²``; without, exactly
        ``torch.mean((output - target) ** 2, dim=(1, ..))``. It must not depend on the block
        (one objective scores the whole stack): anything per block travels in the weights.

        Args:
            output: the nets' outputs, ``[K, B, *D]`` (float32).
            target: the batch targets, ``[K, B, *D]``.
            weight: per-sample weights, ``[K, B]``, or None.

        Returns:
            ``[K]``.
        """
        sq = (output - target) ** 2
        dims = tuple(range(1, output.dim()))
        if weight is None:
            return torch.mean(sq, dim=dims)
        w = weight.to(sq.dtype).reshape(weight.shape + (1,) * (sq.dim() - weight.dim()))
        return torch.mean(w * sq, dim=dims)


class ObjectiveSpec(Spec):
    """The ``train.objective`` section of a config: one registered member per objective.

    Every member has ``prediction``: what the block's net outputs — ``epsilon``, ``x0``, ``v``
    or ``velocity`` (:data:`psm.core.process.PREDICTIONS`); None (the default): the process's
    own. A block that predicts something else than the process is turned into the process's
    prediction for sampling and likelihood (:class:`psm.core.reparam.Reparameterised`), so every
    block of a run gives the same kind of field.
    """

    prediction: Literal["epsilon", "velocity", "x0", "v", "score"] | None = None

    def block_process(self, process: Process) -> Process:
        """The run's process read with this objective's prediction (``process`` when unset)."""
        if self.prediction is None or self.prediction == process.prediction:
            return process
        return process.with_prediction(self.prediction)

    def objective(self, process: Process, t_lo: float, t_hi: float) -> Objective:
        """The block's objective on the run's ``process``, with this spec's prediction."""
        return self.build(self.block_process(process), t_lo, t_hi)

    @abstractmethod
    def build(self, process: Process, t_lo: float, t_hi: float) -> Objective:
        """The objective of one block with training times ``[t_lo, t_hi]``."""
