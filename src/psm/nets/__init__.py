"""Block networks, built by name from the config.

Every net has the signature ``net(x, t) -> output`` with ``x [B, *D]`` and ``t [B]``, output of
the shape of ``x``. Time-free nets (DPSM) accept ``t`` and ignore it, so samplers, the ensemble
trainer and the block router treat all nets alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "elu": lambda: nn.ELU(inplace=True),  # in place after a Linear: same values, less memory
    "silu": lambda: nn.SiLU(inplace=True),
    "relu": lambda: nn.ReLU(inplace=True),
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
}

# the functional form of each activation, for stacked (ensemble) forwards
STACKED_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "elu": lambda h: torch.nn.functional.elu(h, inplace=True),
    "silu": lambda h: torch.nn.functional.silu(h, inplace=True),
    "relu": lambda h: torch.relu_(h),
    "tanh": torch.tanh,
    "softplus": torch.nn.functional.softplus,
}


class PaperMLP(nn.Module):
    """The paper's 2D score MLP (appendix H): ``[x, t, t] → 100 → 150 → 100 → d``, ELU.

    Args:
        dim: data dimension d.
        hidden: hidden widths.
        time_conditioned: append t (``time_repeats`` times) to the input; False gives the
            time-free DPSM twin ``x → 100 → 150 → 100 → d``.
        time_repeats: how many copies of t are appended (the paper uses 2, input width 4).
        activation: name in :data:`ACTIVATIONS`.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (100, 150, 100),
        *,
        time_conditioned: bool = True,
        time_repeats: int = 2,
        activation: str = "elu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        self.dim = dim
        self.activation = activation
        self.time_conditioned = time_conditioned
        self.time_repeats = time_repeats if time_conditioned else 0
        widths = [dim + self.time_repeats, *hidden, dim]
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(w_in, w_out))
            if i < len(widths) - 2:
                layers.append(ACTIVATIONS[activation]())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """``x [B, d]``, ``t [B]`` (ignored when time-free) → output ``[B, d]``."""
        if self.time_repeats:
            if t is None:
                raise ValueError("this net is time-conditioned: pass t")
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
            x = torch.cat([x, t[:, None].expand(-1, self.time_repeats)], dim=1)
        return self.layers(x)

    def stacked_forward(self, params: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        """K nets of this architecture at once, with batched matmuls (the ensemble trainer).

        The same arithmetic as :meth:`forward` for each of the K nets, without vmap's overhead
        (measured in ``psm bench train``).

        Args:
            params: this module's parameter names → stacked tensors ``[K, ...]``.
            x: ``[K, B, d]``.
            t: ``[K, B]``.

        Returns:
            ``[K, B, d]``.
        """
        h = x
        if self.time_repeats:
            h = torch.cat([x, t[..., None].expand(*t.shape, self.time_repeats)], dim=-1)
        act = STACKED_ACTIVATIONS[self.activation]
        linears = [i for i, m in enumerate(self.layers) if isinstance(m, nn.Linear)]
        for j, i in enumerate(linears):
            w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
            h = torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))
            if j < len(linears) - 1:
                h = act(h)
        return h


NetBuilder = Callable[..., nn.Module]

NETS: dict[str, NetBuilder] = {"mlp": PaperMLP}


def build_net(
    name: str,
    dim: int,
    *,
    time_conditioned: bool,
    hidden: Sequence[int] = (100, 150, 100),
    activation: str = "elu",
) -> nn.Module:
    """Build a block net by its config name.

    Args:
        name: a key of :data:`NETS`.
        dim: data dimension.
        time_conditioned: False for DPSM's time-free nets.
        hidden: hidden widths.
        activation: activation name.
    """
    if name not in NETS:
        raise ValueError(f"unknown net {name!r} (choose from {', '.join(sorted(NETS))})")
    return NETS[name](dim, hidden, time_conditioned=time_conditioned, activation=activation)
