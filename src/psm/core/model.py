"""A run's blocks assembled into one vector field over ``[t0, 1]`` (paper appendix A).

A *block* is any callable ``block(x [B, *D], t [B]) -> output [B, *D]`` returning what the
process's network predicts (ε for VP, the velocity for OT flow matching): a trained net, a
closed-form score wrapped as ε, or a lambda in a test. :class:`BlockModel` holds the process,
the partition and the K blocks and turns them into

* the network output, the score and the probability-flow field ``f(x, t)`` (eq. 30) at times
  inside one block (explicit block index, what the integrators use: a block's field is defined
  on its own closed sub-interval, so RK4 stages at a boundary never leak into the neighbour), or
  routed by :meth:`~psm.core.partition.Partition.block_of` for an arbitrary batch of times;
* the reverse-SDE drift and diffusion (eq. 7).

Interval partitions (TPSM, K = 1 is SA-DPM, eqs. 3-4): block i is evaluated at the real t.

Grid partitions (DPSM, eqs. 5-6) have one time-free net per grid time ``τ_i`` (block i owns the
cell ``(t_i, t_{i+1}]`` and sits at ``τ_i = max(t_{i+1}, t0)``). Two fields are offered:

* ``"constant"`` (the paper, appendix H): on cell i the field is ``f(x, τ_i)`` built from net i,
  everything (net and process coefficients) evaluated at ``τ_i``. Euler with one step per cell
  is then exactly eq. 5 (generation) and eq. 6 (likelihood).
* ``"linear"``: the outputs of the two nets at the ends of the cell, ``τ_{i-1}`` and ``τ_i``, are
  mixed linearly in t and the process is applied at the real t; this makes the field
  continuous in t (appendix I.1: "interpolate between successive models"). The first cell has
  no left neighbour: there net 0's *score* at ``τ_1`` is held and the process's coefficients
  follow t (holding the raw ε instead overshoots by ``σ_τ/σ_t`` as t → 0).

Either way, Euler with one step per cell from noise to data is exactly eq. 5: at the upper end
of cell i both fields are net i's at ``τ_i``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from .partition import Partition, Segment
from .process import Process

Block = Callable[[Tensor, Tensor], Tensor]
"""``block(x [B, *D], t [B]) -> network output [B, *D]`` (ε or velocity, as the process says)."""

GridField = Literal["constant", "linear"]
GRID_FIELDS: tuple[str, ...] = ("constant", "linear")


class BlockModel:
    """K blocks assembled into one model over ``[t0, 1]``.

    Args:
        process: the forward process (turns network outputs into fields and scores).
        partition: the block boundaries and the time floor t0.
        blocks: K callables ``block(x [B, *D], t [B]) -> output [B, *D]``, block i for
            partition block i.
        grid_field: for grid (DPSM) partitions, ``"constant"`` (paper eqs. 5-6) or
            ``"linear"`` (outputs interpolated in t); ignored for interval partitions.
        shape: the shape of one sample (``(2,)`` for the 2D sets), needed only to draw
            samples without passing the starting noise.
    """

    def __init__(
        self,
        process: Process,
        partition: Partition,
        blocks: Sequence[Block],
        *,
        grid_field: GridField = "constant",
        shape: tuple[int, ...] | None = None,
    ) -> None:
        if len(blocks) != partition.num_blocks:
            raise ValueError(
                f"{len(blocks)} blocks given for a partition of {partition.num_blocks} blocks"
            )
        if grid_field not in GRID_FIELDS:
            raise ValueError(f"unknown grid_field {grid_field!r} (choose from constant, linear)")
        self.process = process
        self.partition = partition
        self.blocks: tuple[Block, ...] = tuple(blocks)
        self.grid_field: GridField = grid_field
        self.shape = tuple(shape) if shape is not None else None
        self._segments = partition.segments()
        self._cell_cache: dict[int, tuple[float, float]] = {}
        # the same path read with ε-prediction: turns an ε into the field (velocity) at any t
        self._eps_process = process.with_prediction("epsilon")

    def __repr__(self) -> str:
        mode = f", grid_field={self.grid_field!r}" if self.is_grid else ""
        return (
            f"BlockModel({self.process!r}, {self.partition.kind} partition, "
            f"K={self.num_blocks}{mode})"
        )

    # ------------------------------------------------------------------ structure
    @property
    def num_blocks(self) -> int:
        """K."""
        return self.partition.num_blocks

    @property
    def t0(self) -> float:
        """The time floor: integration runs over ``[t0, 1]`` (the partition's)."""
        return self.partition.t0

    @property
    def is_grid(self) -> bool:
        """Whether this is a DPSM (grid) model."""
        return self.partition.kind == "grid"

    def segments(self) -> list[Segment]:
        """Each block's integration interval in increasing time, with the floor t0 applied
        (:meth:`Partition.segments`)."""
        return list(self._segments)

    def net_time(self, block: int) -> float:
        """DPSM: the time ``τ_i = max(t_{i+1}, t0)`` a grid block's net is trained and evaluated
        at: the raw grid point :meth:`Partition.time_point` floored at t0."""
        return self.partition.train_range(block)[0]

    # ------------------------------------------------------------------ evaluation
    def _times(self, t: Tensor | float, x: Tensor) -> Tensor:
        """``t`` as a ``[B]`` tensor of ``x``'s dtype and device."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return t.expand(x.shape[0]) if t.dim() == 0 else t

    def _block_eval(self, x: Tensor, t: Tensor, block: int) -> tuple[Tensor, Tensor]:
        """Network output of block ``block`` and the time the process is applied at.

        Args:
            x: ``[B, *D]``.
            t: ``[B]`` times inside the block's segment.
            block: the block id.

        Returns:
            ``(output [B, *D], t_eff [B])``: ``t_eff`` is ``τ_i`` for a constant DPSM field, else t.
        """
        if not self.is_grid:
            return self.blocks[block](x, t), t
        tau = self.net_time(block)
        tau_t = torch.full_like(t, tau)
        out = self.blocks[block](x, tau_t)
        if self.grid_field == "constant":
            return out, tau_t
        if block == 0 or tau <= self.net_time(block - 1):
            return self._hold_score(out, x, tau_t, t), t
        tau_prev = self.net_time(block - 1)
        w = ((t - tau_prev) / (tau - tau_prev)).clamp(0.0, 1.0)
        w = w.reshape(w.shape + (1,) * (x.dim() - 1))
        prev = self.blocks[block - 1](x, torch.full_like(t, tau_prev))
        return torch.lerp(prev, out, w), t

    def _hold_score(self, out: Tensor, x: Tensor, tau: Tensor, t: Tensor) -> Tensor:
        """The output at time ``t`` whose score equals that of ``out`` at time ``tau``.

        Used on the first DPSM cell, which has no left neighbour: ``ε_t = (σ_t / σ_τ) ε_τ``
        (the score is held, the process's coefficients follow t), converted back to the
        process's own parametrization. Measured on exact mixtures, this is far closer to the
        true field than holding the raw output (ε would be off by σ_τ/σ_t near t = 0).
        """
        eps = self.process.epsilon(out, x, tau)
        ratio = self.process.schedule(t).sigma / self.process.schedule(tau).sigma
        eps_t = eps * ratio.reshape(ratio.shape + (1,) * (x.dim() - 1))
        if self.process.prediction == "velocity":
            # the velocity a network predicts is the ODE field itself (eq. 30 from ε)
            return self._eps_process.velocity(eps_t, x, t)
        return self.process.from_epsilon(eps_t, x, t)

    def _routed(
        self, x: Tensor, t: Tensor | float, block: int | None, fn: Callable[..., Tensor]
    ) -> Tensor:
        t = self._times(t, x)
        if block is not None:
            return fn(x, t, block)
        idx = self.partition.block_of(t.detach().cpu()).to(x.device)
        ids = idx.unique().tolist()
        if len(ids) == 1:
            return fn(x, t, ids[0])
        out = torch.empty_like(x)
        for b in ids:
            m = idx == b
            out[m] = fn(x[m], t[m], b)
        return out

    def output(self, x: Tensor, t: Tensor | float, block: int | None = None) -> Tensor:
        """The (possibly interpolated) network output at ``(x, t)``.

        Args:
            x: ``[B, *D]``.
            t: ``[B]`` or a scalar.
            block: evaluate this block (t must lie in its segment); None routes each sample by
                :meth:`Partition.block_of`.

        Returns:
            ``[B, *D]``, ε or velocity as the process predicts.
        """
        return self._routed(x, t, block, lambda x, t, b: self._block_eval(x, t, b)[0])

    def field(self, x: Tensor, t: Tensor | float, block: int | None = None) -> Tensor:
        """The probability-flow ODE field ``f(x, t)`` (eq. 30; eqs. 3 and 5 per block).

        Args and block routing as in :meth:`output`. Returns ``[B, *D]``.
        """

        def fn(x: Tensor, t: Tensor, b: int) -> Tensor:
            if self.is_grid and self.grid_field == "constant":
                # the paper's DPSM field is f_i(x) = a_i x + c_i net_i(x) on the whole cell:
                # coefficients fixed per block, the time-free net needs no time input
                a, c = self._cell_coefficients(b)
                tau = torch.full_like(t, self.net_time(b))
                return a * x + c * self.blocks[b](x, tau)
            out, t_eff = self._block_eval(x, t, b)
            return self.process.velocity(out, x, t_eff)

        return self._routed(x, t, block, fn)

    def field_divergence(
        self, x: Tensor, t: Tensor | float, block: int
    ) -> tuple[Tensor, Tensor] | None:
        """The field and the exact trace of its Jacobian in x, from the block's own closed form.

        The field is affine in the network output, ``f = a x + c · out``
        (:meth:`Process.field_coefficients`; for DPSM's constant field the cell's fixed
        ``a_i, c_i``), so ``tr ∂f/∂x = a D + c tr ∂out/∂x``. A block offers
        ``tr ∂out/∂x`` through a method ``output_and_trace(x, t) -> (out, trace [B]) | None``
        (:meth:`psm.nets.mlp.PaperMLP.output_and_trace`); any other callable, and DPSM's linear
        field (two nets mixed), get None: the caller then uses autograd
        (:func:`psm.core.likelihood.divergence`).

        Args:
            x: ``[B, *D]``.
            t: ``[B]`` or a scalar, inside the block's segment.
            block: the block id.

        Returns:
            ``(f [B, *D], tr ∂f/∂x [B])``, both equal to :meth:`field` and autograd's trace to
            float rounding; or None.
        """
        fast = getattr(self.blocks[block], "output_and_trace", None)
        if fast is None or (self.is_grid and self.grid_field != "constant"):
            return None
        t = self._times(t, x)
        dim = x[0].numel()
        if self.is_grid:
            a, c = self._cell_coefficients(block)
            res = fast(x, torch.full_like(t, self.net_time(block)))
            if res is None:
                return None
            out, tr = res
            return a * x + c * out, a * dim + c * tr
        res = fast(x, t)
        if res is None:
            return None
        out, tr = res
        a, c = self.process.field_coefficients(t)
        return self.process.velocity(out, x, t), a * dim + c * tr

    def _cell_coefficients(self, block: int) -> tuple[float, float]:
        """DPSM constant field: ``(a_i, c_i)`` with ``f_i(x) = a_i x + c_i net_i(x)`` (eq. 6)."""
        if block not in self._cell_cache:
            tau = torch.tensor(self.net_time(block), dtype=torch.float64)
            a, c = self.process.field_coefficients(tau)
            self._cell_cache[block] = (float(a), float(c))
        return self._cell_cache[block]

    def score(self, x: Tensor, t: Tensor | float, block: int | None = None) -> Tensor:
        """``∇ log p_t(x)`` as modelled, ``[B, *D]``; routing as in :meth:`output`."""

        def fn(x: Tensor, t: Tensor, b: int) -> Tensor:
            out, t_eff = self._block_eval(x, t, b)
            return self.process.score(out, x, t_eff)

        return self._routed(x, t, block, fn)

    def reverse_sde(self, x: Tensor, t: Tensor | float, block: int) -> tuple[Tensor, Tensor]:
        """Reverse-SDE drift and diffusion (eq. 7) inside block ``block``.

        Args:
            x: ``[B, *D]``.
            t: ``[B]`` or a scalar, inside the block's segment.
            block: the block id.

        Returns:
            ``(drift [B, *D], g [B])``; integrate ``dx = drift dt + g dW̄`` from 1 down to t0.
        """
        t = self._times(t, x)
        out, t_eff = self._block_eval(x, t, block)
        return self.process.reverse_sde(out, x, t_eff)
