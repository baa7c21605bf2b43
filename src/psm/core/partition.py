"""Partitions of the diffusion time [0, 1] into blocks, one network each.

* ``interval`` partitions (TPSM, Algorithm 1): edges ``0 = t_0 < t_1 < ... < t_K = 1``; block i
  owns ``[t_i, t_{i+1}]`` and its time-conditioned net is trained on ``t ~ U[t_i, t_{i+1}]``.
  K = 1 is SA-DPM (Algorithm 3).
* ``grid`` partitions (DPSM, Algorithm 2): points ``t_1 < ... < t_N`` with ``t_N = 1`` and
  ``t_0 = 0``; block i (0-based) is the time-free net trained at the single time ``t_{i+1}`` and
  owns the cell ``(t_i, t_{i+1}]`` (eqs. 5-6).

Blocks are numbered from 0 in increasing time. The partition also owns the smallest time used,
``t0`` (paper: 1e-4 for 2D): training and inference run over ``[t0, 1]``, so a block's
effective span is its interval with t0 as a floor (:meth:`Partition.segments`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import PSMError

PartitionKind = Literal["interval", "grid"]

DEFAULT_T0 = 1e-4
"""The paper's smallest diffusion time for 2D data."""


class PartitionError(PSMError, ValueError):
    """A partition that is not a valid cut of [0, 1]."""


@dataclass(frozen=True)
class Segment:
    """The time interval over which one block's field is trained and integrated.

    Attributes:
        block: the block id.
        t_lo: lower end, with the floor t0 applied.
        t_hi: upper end.
    """

    block: int
    t_lo: float
    t_hi: float

    @property
    def length(self) -> float:
        """``t_hi - t_lo``."""
        return self.t_hi - self.t_lo


@dataclass(frozen=True)
class Partition:
    """Block boundaries of the time domain ``[t0, 1]``.

    Attributes:
        edges: ``(t_0 = 0, ..., t_K = 1)``, strictly increasing; ``K`` blocks.
        kind: ``"interval"`` (TPSM/SA) or ``"grid"`` (DPSM: block i sits at ``edges[i + 1]``).
        t0: the smallest time; no block is trained or integrated below it.
    """

    edges: tuple[float, ...]
    kind: PartitionKind = "interval"
    t0: float = DEFAULT_T0

    def __post_init__(self) -> None:
        e = self.edges
        if self.kind not in ("interval", "grid"):
            raise PartitionError(f"unknown partition kind {self.kind!r}")
        if len(e) < 2:
            raise PartitionError("a partition needs at least one block (K >= 1)")
        if any(not (0.0 <= x <= 1.0) for x in e):
            raise PartitionError(f"partition points must lie in [0, 1], got {list(e)}")
        if e[0] != 0.0 or e[-1] != 1.0:
            raise PartitionError(f"partition must start at 0 and end at 1, got {list(e)}")
        if any(b <= a for a, b in itertools.pairwise(e)):
            raise PartitionError(f"partition points must be strictly increasing, got {list(e)}")
        if not 0.0 < self.t0 < 1.0:
            raise PartitionError(f"t0 must lie in (0, 1), got {self.t0}")
        if self.kind == "interval" and e[1] <= self.t0:
            raise PartitionError(
                f"block 0 [0, {e[1]:.4g}] lies wholly below t0={self.t0:g}; "
                "use fewer blocks or a smaller t0"
            )

    @property
    def num_blocks(self) -> int:
        """K, the number of blocks (networks)."""
        return len(self.edges) - 1

    @property
    def time_conditioned(self) -> bool:
        """Whether block nets take t as input (TPSM, SA) or not (DPSM)."""
        return self.kind == "interval"

    def interval(self, block: int) -> tuple[float, float]:
        """The sub-interval ``(t_i, t_{i+1})`` that block ``block`` owns."""
        self._check(block)
        return self.edges[block], self.edges[block + 1]

    def time_point(self, block: int) -> float:
        """DPSM: the grid point ``t_{i+1}``, the right end of block i's cell, as given (the net
        is trained at it floored at t0: :meth:`train_range`, :meth:`BlockModel.net_time`)."""
        self._check(block)
        if self.kind != "grid":
            raise PartitionError("time_point is defined for grid (DPSM) partitions only")
        return self.edges[block + 1]

    def train_range(self, block: int) -> tuple[float, float]:
        """Times block ``block`` is trained on, with the floor t0 applied.

        Interval blocks draw ``t ~ U[lo, hi]``; grid blocks return ``(τ_i, τ_i)`` with
        ``τ_i = max(t_{i+1}, t0)``.
        """
        if self.kind == "grid":
            t = max(self.time_point(block), self.t0)
            return t, t
        lo, hi = self.interval(block)
        return max(lo, self.t0), hi

    def segments(self) -> list[Segment]:
        """Each block's integration interval in increasing time, with the floor t0 applied.

        Grid blocks below t0 (their cell ends at or below it) are left out.
        """
        out = []
        for b in range(self.num_blocks):
            lo, hi = self.interval(b)
            if hi > self.t0:
                out.append(Segment(b, max(lo, self.t0), hi))
        return out

    def block_of(self, t: Tensor | float) -> Tensor:
        """Index of the block that owns each time ``t`` (any shape), a ``long`` tensor.

        Interval blocks own ``[t_i, t_{i+1})`` (the last one also owns 1); grid blocks own
        ``(t_i, t_{i+1}]`` (the first one also owns 0).
        """
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.float64)
        # compare in t's own precision, so that a float32 t equal to an edge counts as on it
        inner = torch.tensor(self.edges[1:-1], dtype=t.dtype, device=t.device)
        idx = torch.searchsorted(inner, t.contiguous(), right=self.kind == "interval")
        return idx.clamp_(0, self.num_blocks - 1)

    def describe(self, block: int) -> str:
        """Human-readable span of a block, e.g. ``[0.1, 0.2]`` or ``t=0.01``."""
        if self.kind == "grid":
            return f"t={self.time_point(block):.4g}"
        lo, hi = self.interval(block)
        return f"[{lo:.4g}, {hi:.4g}]"

    def _check(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise PartitionError(f"block {block} out of range 0..{self.num_blocks - 1}")


def equal(num_blocks: int, *, t0: float = DEFAULT_T0) -> Partition:
    """K equal blocks ``[i/K, (i+1)/K]`` (TPSM_C is ``equal(200)``; ``equal(1)`` is SA-DPM)."""
    if num_blocks < 1:
        raise PartitionError(f"number of blocks must be >= 1, got {num_blocks}")
    edges = tuple(i / num_blocks for i in range(num_blocks)) + (1.0,)
    return Partition(edges, "interval", t0)


def splits(points: Sequence[float], *, t0: float = DEFAULT_T0) -> Partition:
    """Explicit split points, e.g. TPSM_A ``[0, 0.1, 1]`` or TPSM_B ``[0, 0.02, 0.1, 0.3, 1]``."""
    return Partition(tuple(float(p) for p in points), "interval", t0)


def geometric(num_blocks: int, first: float, *, t0: float = DEFAULT_T0) -> Partition:
    """K blocks whose edges after 0 grow geometrically from ``first`` to 1:
    ``[0, first], [first, first·r], ..., [first·r^{K-2}, 1]`` (more blocks near t = 0, where the
    score changes fastest)."""
    if num_blocks < 1:
        raise PartitionError(f"number of blocks must be >= 1, got {num_blocks}")
    if not 0.0 < first < 1.0:
        raise PartitionError(f"the first edge must lie in (0, 1), got {first}")
    if num_blocks == 1:
        return equal(1, t0=t0)
    r = (1.0 / first) ** (1.0 / (num_blocks - 1))
    inner = tuple(first * r**i for i in range(num_blocks - 1))
    return Partition((0.0, *inner, 1.0), "interval", t0)


def grid(points: int | Sequence[float], *, t0: float = DEFAULT_T0) -> Partition:
    """DPSM grid: N equal points ``t_i = i/N`` (i = 1..N), or explicit ``t_1 < ... < t_N = 1``."""
    if isinstance(points, int):
        if points < 1:
            raise PartitionError(f"number of grid points must be >= 1, got {points}")
        return Partition(tuple(i / points for i in range(points)) + (1.0,), "grid", t0)
    pts = [float(p) for p in points]
    if pts and pts[0] <= 0.0:
        raise PartitionError(f"grid points must be > 0, got {pts}")
    return Partition((0.0, *pts), "grid", t0)
