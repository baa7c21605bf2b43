"""Block networks. Each architecture is a module here with its spec (the ``net:`` section of a
config) beside it; :data:`NETS` lists the specs, one line each.

Every net has the signature ``net(x [B, *D], t [B]) -> output [B, *D]`` (see :mod:`.base`).
"""

from __future__ import annotations

from ..spec import Registry
from .activations import ACTIVATION_NAMES, ACTIVATIONS
from .base import BlockNet, NetSpec, StackedForward, is_stackable
from .classic_unet import ClassicUNet, ClassicUNetSpec
from .ddpm_unet import DDPMUNet, DDPMUNetSpec
from .mlp import MLPSpec, PaperMLP

NETS: Registry[NetSpec] = Registry("net", [MLPSpec, DDPMUNetSpec, ClassicUNetSpec], default="mlp")

__all__ = [
    "ACTIVATIONS", "ACTIVATION_NAMES", "NETS", "BlockNet", "ClassicUNet", "ClassicUNetSpec",
    "DDPMUNet", "DDPMUNetSpec", "MLPSpec", "NetSpec", "PaperMLP", "StackedForward", "is_stackable",
]  # fmt: skip
