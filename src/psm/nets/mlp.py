"""The paper's 2D score MLP (appendix H) and its spec.

``[x, t, t] → 100 → 150 → 100 → d`` with ELU; the time-free twin (DPSM) drops the time inputs.
Points of any shape are flattened on the way in and reshaped on the way out, so the same MLP is
also a (weak) baseline on small images.

:meth:`PaperMLP.output_and_trace` gives the output and the exact trace of its Jacobian in x in
closed form (the likelihood's fast path, :meth:`psm.core.model.BlockModel.field_divergence`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from .activations import ACTIVATION_NAMES, ACTIVATIONS, STACKED_ACTIVATIONS
from .base import BlockNet, NetSpec

F = nn.functional


# ---------------------------------------------------------------------- activation derivatives
# Each takes the pre-activation z (which it may overwrite) and returns (act(z), act'(z)).
def _elu(z: Tensor) -> tuple[Tensor, Tensor]:
    # alpha = 1: elu(z) = (exp(min(z, 0)) - 1) + max(z, 0) and elu'(z) = exp(min(z, 0)): one
    # exp for both (on a CPU torch's elu alone, an expm1, takes about as long); exact for
    # z > 0, equal to float rounding below
    slope = z.clamp(max=0.0).exp_()
    return slope.sub(1.0).add_(z.clamp_(min=0.0)), slope


def _silu(z: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(z)
    return F.silu(z), s * (1.0 + z * (1.0 - s))


def _relu(z: Tensor) -> tuple[Tensor, Tensor]:
    return F.relu(z), (z > 0).to(z.dtype)


def _tanh(z: Tensor) -> tuple[Tensor, Tensor]:
    a = torch.tanh(z)
    return a, 1.0 - a * a


def _softplus(z: Tensor) -> tuple[Tensor, Tensor]:
    # nn.Softplus: beta 1, linear above the threshold 20 (slope exactly 1 there)
    return F.softplus(z), torch.where(z > 20.0, 1.0, torch.sigmoid(z))


ACTIVATION_DERIVATIVES: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "elu": _elu,
    "silu": _silu,
    "relu": _relu,
    "tanh": _tanh,
    "softplus": _softplus,
}
"""``z -> (act(z), act'(z))`` for the activations whose Jacobian trace the MLP computes in
closed form (``z`` may be overwritten); an activation missing here makes
:meth:`PaperMLP.output_and_trace` answer None."""

FOURIER_SEED = 20201218
"""Seed of the MLP's fixed Fourier frequencies (the same in every block and run)."""

TRACE_CHUNK_ELEMENTS = 1 << 18
""":meth:`PaperMLP.output_and_trace` works through the batch in chunks of about this many
values per layer (``rows x (1 + D) x widest layer``: the hidden values and their D tangents), so
that they stay in the CPU's cache (one large batch runs measurably slower per point)."""

TRACE_CHUNK_ELEMENTS_DEVICE = 1 << 26
"""The same on an accelerator, where only memory bounds a chunk (256 MB of float32 per layer):
small chunks would only add kernel launches."""


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
        fourier: add ``2 * fourier`` inputs ``sin(2π x B), cos(2π x B)`` with ``B [D, fourier]``
            fixed Gaussian frequencies of scale ``fourier_scale`` (Tancik et al. 2020), drawn
            from a fixed seed so every block of a run has the same B (a buffer, saved with
            the weights). 0: none (the paper).
        fourier_scale: the standard deviation of the frequencies.
        time_input: ``"t"`` (the paper) or ``"log"``: the net sees ``log t``. Within a block
            near t = 0 (e.g. [1e-4, 0.003]) t itself barely moves the first layer, so a net fed
            t cannot tell σ(t) = 2e-4 from 7e-3; ``log t`` spans such a block evenly.
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
        fourier: int = 0,
        fourier_scale: float = 1.0,
        time_input: Literal["t", "log"] = "t",
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
        if time_input not in ("t", "log"):
            raise ValueError(f"unknown time_input {time_input!r} (choose from t, log)")
        self.time_input = time_input
        self.fourier = int(fourier)
        if self.fourier:
            gen = torch.Generator().manual_seed(FOURIER_SEED)
            freqs = torch.randn(dim, self.fourier, generator=gen) * fourier_scale
            self.register_buffer("fourier_freqs", 2 * math.pi * freqs)
        widths = [dim + 2 * self.fourier + self.time_repeats, *hidden, dim]
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
        return self.layers(self._inputs(x, t)).reshape(x.shape)

    def _inputs(self, x: Tensor, t: Tensor | None) -> Tensor:
        """The first layer's input ``[B, D (+ 2 fourier) (+ time_repeats)]``: x flattened,
        its Fourier features, t repeated."""
        h = x.flatten(1)
        if self.fourier:
            proj = h @ self.fourier_freqs.to(h.dtype)
            h = torch.cat([h, torch.sin(proj), torch.cos(proj)], dim=1)
        if self.time_repeats:
            if t is None:
                raise ValueError("this net is time-conditioned: pass t")
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
            t = self._time(t)
            h = torch.cat([h, t[:, None].expand(-1, self.time_repeats)], dim=1)
        return h

    def _time(self, t: Tensor) -> Tensor:
        """What the net is fed for time ``t`` (any shape): t, or log t (``time_input``)."""
        return t if self.time_input == "t" else torch.log(t.clamp(min=1e-30))

    def output_and_trace(self, x: Tensor, t: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """The output and the exact trace of its Jacobian in ``x``, in closed form.

        For ``h_1 = act(W_1 [x, t] + b_1)``, ``h_i = act(W_i h_{i-1} + b_i)`` and the output
        ``W_L h_{L-1} + b_L``, the Jacobian in x is ``W_L A_{L-1} W_{L-1} ... A_1 U`` with
        ``A_i = diag(act'(z_i))`` per sample and ``U`` the D columns of ``W_1`` on x. Its trace
        is ``Σ_k w_k^T A_{L-1} W_{L-1} ... A_1 u_k`` (``u_k`` column k of ``U``, ``w_k`` row k of
        ``W_L``): D forward-mode tangents carried together, started past the first layer
        (``W_2 A_1 u_k = (W_2 diag(u_k)) act'(z_1)``, one product with the D matrices side by
        side) and ended with a dot product with ``w_k``. The same matrix products as autograd's D
        backward passes, without its graph, its small first- and last-layer products and most of
        its element-wise passes, in chunks of the batch that stay in a CPU's cache. Output and
        trace equal :meth:`forward`'s and autograd's to float rounding. Like
        :func:`psm.core.likelihood.divergence`, it keeps no graph: the results carry no gradient.

        Args:
            x: ``[B, *shape]``.
            t: ``[B]`` (ignored when time-free).

        Returns:
            ``(output [B, *shape], trace [B])``, or None where this net cannot (an activation
            without a derivative in :data:`ACTIVATION_DERIVATIVES`, or dropout in training
            mode): the caller then falls back to autograd.
        """
        act = ACTIVATION_DERIVATIVES.get(self.activation)
        if act is None or (self.training and self.dropout > 0) or self.fourier:
            return None  # (Fourier features: the first layer is not linear in x)
        h = self._inputs(x, t)
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        d = linears[-1].out_features
        u = linears[0].weight[:, :d]  # [h_1, D]: the first layer's columns on x
        w = linears[-1].weight  # [D, h_{L-1}]
        budget = TRACE_CHUNK_ELEMENTS if h.device.type == "cpu" else TRACE_CHUNK_ELEMENTS_DEVICE
        rows = max(1, budget // ((1 + d) * max(m.out_features for m in linears)))
        with torch.no_grad():
            if len(linears) == 2:  # one hidden layer: tr = act'(z_1) · (Σ_k u_k ⊙ w_k)
                first = (u * w.t()).sum(1)
            else:  # [D h_2, h_1]: the D matrices W_2 diag(u_k), stacked
                first = (linears[1].weight[None] * u.t()[:, None, :]).flatten(0, 1)
            parts = [_mlp_output_and_trace(hc, linears, act, first) for hc in h.split(rows)]
        if len(parts) == 1:
            out, tr = parts[0]
        else:
            out, tr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return out.reshape(x.shape), tr

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
        if self.fourier:  # the same fixed frequencies in every block
            proj = h @ self.fourier_freqs.to(h.dtype)
            h = torch.cat([h, torch.sin(proj), torch.cos(proj)], dim=-1)
        if self.time_repeats:
            t = self._time(t)
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


def _mlp_output_and_trace(
    h: Tensor,
    linears: Sequence[nn.Linear],
    act: Callable[[Tensor], tuple[Tensor, Tensor]],
    first: Tensor,
) -> tuple[Tensor, Tensor]:
    """:meth:`PaperMLP.output_and_trace` of one chunk.

    Args:
        h: the net's input ``[n, D + time inputs]``.
        linears: the net's linear layers.
        act: the activation with its derivative (:data:`ACTIVATION_DERIVATIVES`).
        first: one hidden layer: ``Σ_k u_k ⊙ w_k`` ``[h_1]``; more: the stacked
            ``W_2 diag(u_k)`` ``[D h_2, h_1]``.

    Returns:
        ``(output [n, D], trace [n])``.
    """
    slopes = []
    for lin in linears[:-1]:
        h, slope = act(F.linear(h, lin.weight, lin.bias))
        slopes.append(slope)
    last = linears[-1]
    out = F.linear(h, last.weight, last.bias)
    if len(slopes) == 1:
        return out, slopes[0] @ first
    n, d = out.shape
    tan = F.linear(slopes[0], first).view(n, d, -1)  # [n, D, h_2]: W_2 A_1 u_k, k = 1..D
    for lin, slope in zip(linears[2:-1], slopes[1:-1], strict=True):
        tan = F.linear(tan.mul_(slope[:, None, :]).view(n * d, -1), lin.weight).view(n, d, -1)
    tan = tan.mul_(slopes[-1][:, None, :])  # [n, D, h_{L-1}]: A_{L-1} ... A_1 u_k
    return out, (tan * last.weight).sum((1, 2))


class MLPSpec(NetSpec):
    """``net: {name: mlp}``: the paper MLP (the 2D default)."""

    name: Literal["mlp"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [100, 150, 100])  # hidden widths
    activation: str = "elu"  # elu (paper) | silu | relu | tanh | softplus
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # after each hidden activation
    input_scale: float = Field(1.0, gt=0.0)  # first-layer x-weights x this at initialisation
    fourier: int = Field(0, ge=0)  # fixed Fourier features sin/cos(2π x B) of x, B [D, fourier]
    fourier_scale: float = Field(1.0, gt=0.0)  # std of the frequencies B
    time_input: Literal["t", "log"] = "t"  # log: the net is fed log t (blocks near t = 0)

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
            dropout=self.dropout, input_scale=self.input_scale, fourier=self.fourier,
            fourier_scale=self.fourier_scale, time_input=self.time_input,
        )  # fmt: skip
