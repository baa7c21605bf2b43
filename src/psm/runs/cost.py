"""What each block's net costs: parameters and floating-point operations.

Blocks may have nets of their own (``blocks:``), so comparisons between runs are only fair at
equal compute: ``psm train --dry-run`` prints, per distinct net, its parameters, the FLOPs of
one forward pass per sample (counted by :class:`torch.utils.flop_counter.FlopCounterMode` on
the meta device: nothing is allocated), and each block's training FLOPs,
``3 x forward x batch x steps`` (a backward pass costs about twice a forward one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import RunConfig
from .run_parts import Parts

TRAIN_FLOPS_PER_FORWARD = 3
"""Forward + backward of one training step, in forward passes (the usual estimate)."""


@dataclass(frozen=True)
class NetCost:
    """One net's size and cost.

    Attributes:
        params: trainable parameters.
        forward_flops: FLOPs of one forward pass for one sample (multiply-add = 2).
    """

    params: int
    forward_flops: int


def net_cost(parts: Parts, block: int | None = None) -> NetCost:
    """Block ``block``'s net (None: the run's own ``net:``), counted on the meta device."""
    _ = parts.shape  # the data's shape first: data are not built on the meta device
    shape = parts.shape
    with torch.device("meta"):
        net = parts.new_net(block)
        x = torch.empty(1, *shape)
        t = torch.empty(1)
        with FlopCounterMode(display=False) as counter:
            net(x, t)
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return NetCost(params, int(counter.get_total_flops()))


def block_costs(cfg: RunConfig, parts: Parts, blocks: list[int]) -> dict[int, NetCost]:
    """Each block's :class:`NetCost` (one count per distinct net spec)."""
    by_key: dict[str, NetCost] = {}
    out = {}
    for b in blocks:
        key = cfg.net_key(b)
        if key not in by_key:
            by_key[key] = net_cost(parts, b)
        out[b] = by_key[key]
    return out


def training_flops(cfg: RunConfig, cost: NetCost, block: int) -> int:
    """Training FLOPs of block ``block`` to its step target."""
    steps = cfg.step_target(block)
    return TRAIN_FLOPS_PER_FORWARD * cost.forward_flops * cfg.train.batch_size * steps


def format_count(n: float) -> str:
    """``12.3k``, ``4.56M``, ``7.8G``, ``1.2T``."""
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"
