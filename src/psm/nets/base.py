"""What every block net is: ``net(x [B, *D], t [B]) -> output [B, *D]``, built from a spec.

Time-free nets (DPSM) accept ``t`` and ignore it, so samplers, the trainer and the block router
treat all nets alike. Any ``nn.Module`` with that forward works; psm's own nets derive from
:class:`BlockNet`, which declares what the ensemble trainer (:mod:`psm.training.stack`) reads
of a net: whether K copies can be stacked (``stackable``) and, as the capability
:class:`StackedForward`, a faster forward of K stacked copies.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from ..spec import Spec


class BlockNet(nn.Module):
    """Base of psm's block nets.

    Attributes:
        stackable: whether K copies can run as one model under ``torch.func.vmap`` (each
            sample's output depends on that sample only); False for batch statistics
            (BatchNorm in training mode). Class or instance attribute.
    """

    stackable: bool = True


def is_stackable(net: nn.Module) -> bool:
    """A net's ``stackable`` (:class:`BlockNet`); a module that does not derive from it
    declares nothing and is taken as stackable."""
    return net.stackable if isinstance(net, BlockNet) else True


@runtime_checkable
class StackedForward(Protocol):
    """A net that runs K copies of itself from stacked parameters faster than vmap (the paper
    MLP: one batched matmul per layer)."""

    def stacked_forward(self, params: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        """K nets of this architecture at once.

        Args:
            params: the module's parameter names → stacked tensors ``[K, ...]``.
            x: ``[K, B, *D]``.
            t: ``[K, B]``.

        Returns:
            ``[K, B, *D]``, net k's output on ``x[k], t[k]``.
        """
        ...


class NetSpec(Spec):
    """The ``net:`` section of a config: one registered member per architecture."""

    @abstractmethod
    def build(self, shape: tuple[int, ...], *, time_conditioned: bool) -> nn.Module:
        """A fresh net for points of ``shape`` (``(2,)``, ``(C, H, W)``).

        Args:
            shape: the shape of one data point.
            time_conditioned: False for DPSM's time-free nets (one per grid time).

        Raises:
            ValueError: the architecture cannot take points of this shape (one line).
        """
