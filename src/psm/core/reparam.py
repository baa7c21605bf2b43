"""A block net that predicts one thing, read as another: per-block parameterisations.

A block may learn ε, the clean point x0, Salimans & Ho's ``v = α_t ε − σ_t x0`` or the flow
velocity (``train.objective.prediction``, per block through ``blocks:``), while sampling and the
likelihood read every block in the run process's own prediction (:class:`~psm.core.model.
BlockModel` holds one process). Each prediction is affine in ε given ``x_t``
(:meth:`Process.epsilon_affine`: ``ε = A x + C out``), so the conversion is exact:

    ε = A_from(t) x + C_from(t) net(x, t),        out = (ε − A_to(t) x) / C_to(t).

Near t = 0 this matters for what a net must learn, not for what the model is: a net predicting
ε must output a function that varies on the scale of σ(t), one predicting x0 need not; both
give the same field when they predict exactly (``tests/test_reparam.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .process import Process


class Reparameterised(nn.Module):
    """``net`` (trained to predict ``source.prediction``) giving ``target.prediction``.

    Args:
        net: ``net(x [B, *D], t [B]) -> [B, *D]`` in ``source``'s prediction.
        source: the process read with the block's prediction.
        target: the same path read with the prediction the model expects.

    The wrapped net stays a submodule (``.net``), so ``.to()``/``.eval()`` reach it; its
    weights are loaded into ``.net`` before wrapping.
    """

    def __init__(self, net: nn.Module, source: Process, target: Process) -> None:
        super().__init__()
        self.net = net
        self.source, self.target = source, target

    def extra_repr(self) -> str:
        return f"{self.source.prediction} -> {self.target.prediction}"

    def _convert(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        eps = self.source.epsilon(out, x, t)
        return self.target.from_epsilon(eps, x, t)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``[B, *D], [B] -> [B, *D]`` in the target's prediction."""
        return self._convert(self.net(x, t), x, t)

    def output_and_trace(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor] | None:
        """The output and ``tr ∂out/∂x`` from the net's own one-pass trace, when it has one.

        With ``ε = A x + C net`` and ``out = (ε − A' x) / C'`` (all coefficients per sample),
        ``tr ∂out/∂x = (A D + C tr ∂net/∂x − A' D) / C'`` with D the dimension of one sample.
        """
        fast = getattr(self.net, "output_and_trace", None)
        if fast is None:
            return None
        res = fast(x, t)
        if res is None:
            return None
        raw, tr = res
        dim = x[0].numel()
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        a, c = self.source.epsilon_affine(t)
        a2, c2 = self.target.epsilon_affine(t)
        out = self._convert(raw, x, t)
        tr_out = (a * dim + c * tr - a2 * dim) / c2
        return out, tr_out


def as_prediction(net: nn.Module, source: Process, target: Process) -> nn.Module:
    """``net`` as is when it already predicts what ``target`` reads, else wrapped."""
    if source.prediction == target.prediction:
        return net
    return Reparameterised(net, source, target)


__all__ = ["Reparameterised", "as_prediction"]
