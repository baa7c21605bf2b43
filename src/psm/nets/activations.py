"""Activation functions by config name: module form and the functional form stacked nets use."""

from __future__ import annotations

from collections.abc import Callable

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

ACTIVATION_NAMES: tuple[str, ...] = tuple(ACTIVATIONS)
