"""Progress bars for the layers above the maths: a tqdm-backed :class:`~psm.core.progress.Progress`.

The core (:mod:`psm.core`) reports progress to whatever it is given and shows nothing itself;
the runs, commands, figures and benchmarks make the bar here and pass it down::

    with progress_bar("NLL", enabled=not args.no_progress) as bar:
        evaluate_nll(model, x, progress=bar)

The bar is created when the core calls ``start(total)`` (it knows the number of solver steps),
moves at every ``advance``, shows ``note`` as its postfix, and is removed when the ``with``
block ends (``leave=False``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

from .core.progress import Progress


class TqdmProgress:
    """A :class:`~psm.core.progress.Progress` drawn as a tqdm bar.

    Args:
        desc: the bar's label (``"NLL"``, ``"sample (ode)"``).
        unit: what the count counts (solver ``"step"`` s).
        leave: keep the finished bar on screen.
    """

    def __init__(self, desc: str, *, unit: str = "step", leave: bool = False) -> None:
        self.desc = desc
        self.unit = unit
        self.leave = leave
        self.bar: tqdm | None = None

    def start(self, total: int) -> None:
        self.close()
        self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, leave=self.leave)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        """Remove the bar (a later ``start`` draws a new one)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def progress_bar(
    desc: str, *, enabled: bool = True, unit: str = "step", leave: bool = False
) -> Iterator[Progress | None]:
    """A :class:`TqdmProgress` for the ``with`` block (closed at its end), or None when not
    ``enabled``; pass it as a core function's ``progress=``."""
    if not enabled:
        yield None
        return
    bar = TqdmProgress(desc, unit=unit, leave=leave)
    try:
        yield bar
    finally:
        bar.close()
