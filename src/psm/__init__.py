"""psm: Parallel Score Matching for diffusion models.

The diffusion time [0, 1] is cut into blocks, each block gets its own score network, all blocks
train independently, and sampling and exact likelihoods run the probability-flow ODE through
the blocks in sequence.

The short Python API (:mod:`psm.api`, imported on first use so that ``import psm`` stays cheap
and loads no torch): ``psm.train(config, out=None, **overrides) -> Run``,
``psm.load(run_or_file, device="cpu") -> Model`` (``log_prob``, ``sample``, ``nll``,
``bits_per_dim``) and ``psm.export(run, "model.safetensors")``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import Model, export, load, train

__all__ = ["Model", "__version__", "export", "load", "train"]

_API = ("Model", "export", "load", "train")


def __getattr__(name: str) -> Any:
    """``psm.train``, ``psm.load``, ``psm.export``, ``psm.Model``: from :mod:`psm.api`, imported
    on first use."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'psm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
