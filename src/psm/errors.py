"""Errors a user can cause and fix. The CLI prints each as one line and exits with code 2."""

from __future__ import annotations


class PSMError(Exception):
    """Base of every user-facing error (bad input, bad run directory, bad checkpoint)."""


class ConfigError(PSMError, ValueError):
    """A config file or override that cannot be used; the message names the field."""


class RunError(PSMError):
    """A run directory that is missing, foreign, or holds another config."""


class CheckpointError(PSMError):
    """A block checkpoint that is unreadable, truncated, or from another config."""


class BlockError(PSMError):
    """A block that failed while training (e.g. a non-finite loss)."""


class IncompleteRunError(RunError):
    """A run whose blocks are not all trained, used where the whole model is needed."""
