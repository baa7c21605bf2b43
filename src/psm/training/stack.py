"""K block nets of one architecture trained as one model: the mechanics of stacking.

The training loop (:mod:`psm.training.train`) sees a :class:`NetStack`: a forward over
``x [K, B, *D], t [K, B] -> [K, B, *D]``, the tensors the optimizer steps, and per-block views of
weights and optimizer state for the per-block checkpoints. Two kinds:

* :class:`SingleNet` (K = 1): the module itself, called as usual. Any module works (BatchNorm,
  ``torch.compile``), and the arithmetic is exactly that of a plain training loop.
* :class:`StackedNets` (K > 1): parameters stacked with :func:`torch.func.stack_module_state`.
  The forward is the net's own ``stacked_forward`` when it has one (the paper MLP: batched
  matmuls, faster than vmap on CPU), else ``vmap(functional_call, randomness="different")``:
  random layers (dropout) draw independent masks per block from the global generator.

Stacking is exact: the per-block losses are summed, so block k's gradient is that of its own
loss, and Adam is elementwise, so one Adam over stacked tensors is K independent Adams (blocks
are stacked only with blocks at the same step, so the bias corrections agree too).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from ..errors import RunError
from ..nets.base import StackedForward, is_stackable


class NetStack(ABC):
    """K nets of one architecture behind one forward.

    Attributes:
        size: K.
        params: parameter name → the tensor the optimizer steps (``[K, ...]`` when stacked).
    """

    size: int
    params: dict[str, Tensor]

    @abstractmethod
    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """``x [K, B, *D]``, ``t [K, B]`` → outputs ``[K, B, *D]``."""

    @abstractmethod
    def net_state(self, k: int) -> dict[str, Tensor]:
        """Block k's ``state_dict`` (parameters and buffers; may be views)."""

    @abstractmethod
    def part(self, value: Tensor, k: int) -> Tensor:
        """Block k's share of a tensor shaped like a stacked parameter (e.g. Adam moments)."""

    @abstractmethod
    def join(self, values: Sequence[Tensor]) -> Tensor:
        """The inverse of :meth:`part`: K per-block tensors → one tensor like a parameter."""

    @abstractmethod
    def train(self, mode: bool = True) -> None:
        """Training (dropout on, batch statistics) or evaluation mode."""

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale each block's gradient so that its norm (over all its parameters) is at most
        ``max_norm``; blocks never share a norm, so stacking stays exact. Returns the K norms
        before clipping."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if not grads:
            return torch.zeros(self.size)
        sq = sum(self._per_block(g.detach().pow(2)) for g in grads)
        norms = torch.sqrt(sq)
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(self._broadcast(scale, g))
        return norms

    def _per_block(self, value: Tensor) -> Tensor:
        """``[K]`` sums of a parameter-shaped tensor per block."""
        return torch.stack([self.part(value, k).sum() for k in range(self.size)])

    def _broadcast(self, per_block: Tensor, like: Tensor) -> Tensor:
        """``[K]`` values shaped to multiply a parameter-shaped tensor block by block."""
        if self.size == 1 and like.dim() == 0:
            return per_block[0]
        shape = (self.size,) + (1,) * (like.dim() - 1) if self.size > 1 else (1,) * like.dim()
        return per_block.reshape(shape).to(like)


class SingleNet(NetStack):
    """One net (K = 1), called as a plain module (``compile``: through :func:`torch.compile`,
    the module itself keeping the weights)."""

    def __init__(self, net: nn.Module, *, compile: bool = False) -> None:
        self.net = net
        self.size = 1
        self.params = dict(net.named_parameters())
        self._call = torch.compile(net) if compile else net

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self._call(x[0], t[0]).unsqueeze(0)

    def _per_block(self, value: Tensor) -> Tensor:
        return value.sum().reshape(1)

    def net_state(self, k: int) -> dict[str, Tensor]:
        return self.net.state_dict()

    def part(self, value: Tensor, k: int) -> Tensor:
        return value

    def join(self, values: Sequence[Tensor]) -> Tensor:
        return values[0]

    def train(self, mode: bool = True) -> None:
        self.net.train(mode)


class StackedNets(NetStack):
    """K > 1 nets with stacked parameters and buffers (see the module docstring).

    Args:
        nets: K modules of the same architecture (their current weights are stacked).

    Raises:
        RunError: the architecture cannot be stacked (``stackable = False``, e.g. BatchNorm,
            whose running statistics cannot be updated under vmap).
    """

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        template = nets[0]
        if not is_stackable(template):
            raise RunError(
                f"{type(template).__name__} cannot be stacked (batch statistics); "
                "train its blocks one per worker (--executor local)"
            )
        self.size = len(nets)
        params, buffers = stack_module_state(list(nets))
        self.params: dict[str, Tensor] = params
        self.buffers: dict[str, Tensor] = buffers
        self._template = template
        self._base = copy.deepcopy(template).to("meta")
        if isinstance(template, StackedForward):
            fast = template.stacked_forward
            self._forward = lambda x, t: fast(self.params, x, t)
        else:
            base = self._base

            def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
                return functional_call(base, (p, b), (x, t))

            batched = vmap(one, randomness="different")
            self._forward = lambda x, t: batched(self.params, self.buffers, x, t)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self._forward(x, t)

    def net_state(self, k: int) -> dict[str, Tensor]:
        return {n: p[k] for n, p in self.params.items()} | {
            n: b[k] for n, b in self.buffers.items()
        }

    def part(self, value: Tensor, k: int) -> Tensor:
        return value[k]

    def join(self, values: Sequence[Tensor]) -> Tensor:
        return torch.stack(list(values))

    def train(self, mode: bool = True) -> None:
        self._template.train(mode)
        self._base.train(mode)


def stack_nets(nets: Sequence[nn.Module], *, compile: bool = False) -> NetStack:
    """A :class:`SingleNet` for one net (compiled if asked), :class:`StackedNets` for several."""
    if len(nets) == 1:
        return SingleNet(nets[0], compile=compile)
    return StackedNets(nets)
