"""The paper's 2D score MLP (appendix H) and its spec.

``[x, t, t] → 100 → 150 → 100 → d`` with ELU; the time-free twin (DPSM) drops the time inputs.
Points of any shape are flattened on the way in and reshaped on the way out, so the same MLP is
also a (weak) baseline on small images.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from .activations import ACTIVATION_NAMES, ACTIVATIONS, STACKED_ACTIVATIONS
from .base import BlockNet, NetSpec


class PaperMLP(BlockNet):
    """The paper's score MLP: ``[x, t, t] → 100 → 150 → 100 → d``, ELU (appendix H).

    Args:
        shape: the shape of one point (an int d for flat points); inputs are flattened.
        hidden: hidden widths.
        time_conditioned: append t (``time_repeats`` times) to the input; False gives the
            time-free DPSM twin ``x → 100 → 150 → 100 → d``.
        time_repeats: how many copies of t are appended (the paper uses 2, input width 4).
        activation: name in :data:`~psm.nets.activations.ACTIVATIONS`.
        dropout: dropout probability after each hidden activation (0: none, the paper).
        input_scale: multiplies the first layer's weights on ``x`` at initialisation (1:
            PyTorch's default). Larger values let the MLP resolve sharp features of the score
            sooner (a remedy for the spectral bias of small MLPs, like Fourier features).
    """

    def __init__(
        self,
        shape: int | Sequence[int],
        hidden: Sequence[int] = (100, 150, 100),
        *,
        time_conditioned: bool = True,
        time_repeats: int = 2,
        activation: str = "elu",
        dropout: float = 0.0,
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        dim = math.prod(self.shape)
        self.activation = activation
        self.dropout = float(dropout)
        self.time_conditioned = time_conditioned
        self.time_repeats = time_repeats if time_conditioned else 0
        widths = [dim + self.time_repeats, *hidden, dim]
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(w_in, w_out))
            if i < len(widths) - 2:
                layers.append(ACTIVATIONS[activation]())
                if self.dropout > 0:
                    layers.append(nn.Dropout(self.dropout))
        self.layers = nn.Sequential(*layers)
        if input_scale != 1.0:
            with torch.no_grad():
                self.layers[0].weight[:, :dim] *= input_scale

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """``x [B, *shape]``, ``t [B]`` (ignored when time-free) → output ``[B, *shape]``."""
        h = x.flatten(1)
        if self.time_repeats:
            if t is None:
                raise ValueError("this net is time-conditioned: pass t")
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
            h = torch.cat([h, t[:, None].expand(-1, self.time_repeats)], dim=1)
        return self.layers(h).reshape(x.shape)

    def stacked_forward(self, params: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        """K nets of this architecture at once, with batched matmuls (the ensemble trainer).

        The same arithmetic as :meth:`forward` for each of the K nets, without vmap's overhead
        (measured in ``psm bench train``). Dropout masks are drawn independently per net.

        Args:
            params: this module's parameter names → stacked tensors ``[K, ...]``.
            x: ``[K, B, *shape]``.
            t: ``[K, B]``.

        Returns:
            ``[K, B, *shape]``.
        """
        h = x.flatten(2)
        if self.time_repeats:
            h = torch.cat([h, t[..., None].expand(*t.shape, self.time_repeats)], dim=-1)
        act = STACKED_ACTIVATIONS[self.activation]
        linears = [i for i, m in enumerate(self.layers) if isinstance(m, nn.Linear)]
        for j, i in enumerate(linears):
            w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
            h = torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))
            if j < len(linears) - 1:
                h = act(h)
                if self.dropout > 0:
                    h = torch.nn.functional.dropout(h, self.dropout, self.training)
        return h.reshape(x.shape)


class MLPSpec(NetSpec):
    """``net: {name: mlp}``: the paper MLP (the 2D default)."""

    name: Literal["mlp"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [100, 150, 100])  # hidden widths
    activation: str = "elu"  # elu (paper) | silu | relu | tanh | softplus
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # after each hidden activation
    input_scale: float = Field(1.0, gt=0.0)  # first-layer x-weights x this at initialisation

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, v: str) -> str:
        if v not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {v!r} (choose from {', '.join(ACTIVATION_NAMES)})"
            )
        return v

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(w < 1 for w in v):
            raise ValueError("hidden widths must be a non-empty list of positive integers")
        return v

    def build(self, shape: tuple[int, ...], *, time_conditioned: bool) -> nn.Module:
        return PaperMLP(
            shape, self.hidden, time_conditioned=time_conditioned, activation=self.activation,
            dropout=self.dropout, input_scale=self.input_scale,
        )  # fmt: skip
