"""How a long computation in the core reports how far it has got, without showing anything.

The maths shows no bar and imports no UI library. A caller that wants one passes a
:class:`Progress` (``psm.progress.progress_bar`` makes a tqdm-backed one); the samplers and the
NLL evaluator call ``start(total)`` once with the number of solver steps of the whole job,
``note(text)`` as each batch begins (``"batch 2/5"``), and ``advance(1)`` after every solver step
(every block for adaptive solvers), so a long solve never looks stuck. ``progress=None`` (or
``False``): no report.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    """Where a long job reports its progress, in solver steps."""

    def start(self, total: int) -> None:
        """The job begins: ``total`` steps to go (a reused reporter starts afresh)."""
        ...

    def advance(self, n: int = 1) -> None:
        """``n`` more steps are done."""
        ...

    def note(self, text: str) -> None:
        """A short status beside the count (``"batch 2/5"``)."""
        ...


def check_progress(progress: Progress | bool | None) -> Progress | None:
    """``progress`` if it is a :class:`Progress`; None for None or ``False`` (no report).

    Raises:
        TypeError: anything else (``progress=True``: the core draws no bar itself).
    """
    if progress is None or progress is False:
        return None
    if isinstance(progress, Progress):
        return progress
    raise TypeError(
        f"progress must be a psm.core.progress.Progress or None, not {progress!r} "
        "(psm.progress.progress_bar makes a tqdm bar)"
    )
