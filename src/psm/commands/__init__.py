"""The subcommands of ``psm``, one module each.

Each module defines ``add(sub)`` that registers its parser with ``set_defaults(func=...)``.
"""

from __future__ import annotations

import argparse
import importlib

COMMAND_MODULES: tuple[str, ...] = (
    "train", "status", "nll", "kl", "sample", "score", "compare", "export", "prune", "plot", "demo",
    "bench", "data", "reproduce",
)  # fmt: skip


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register every command module's parser."""
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").add(sub)
