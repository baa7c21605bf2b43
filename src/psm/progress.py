"""Progress bars for the layers above the maths: a tqdm bar on a terminal, plain lines in a log.

The core (:mod:`psm.core`) reports progress to whatever it is given and shows nothing itself;
the runs, commands, figures and benchmarks make the bar here and pass it down::

    with progress_bar("NLL", enabled=not args.no_progress) as bar:
        evaluate_nll(model, x, progress=bar)

The bar is created when the core calls ``start(total)`` (it knows the number of solver steps),
moves at every ``advance``, shows ``note`` as its postfix, and is removed when the ``with``
block ends (``leave=False``). Code that drives a bar itself (the training monitor, ``psm
prepare``, the figures) makes it with :func:`make_bar`, which takes tqdm's arguments.

**Where the output goes decides how it looks.** A bar writes to stderr (or the ``file`` it is
given). When that stream is a terminal (or a Jupyter notebook) the bar is tqdm's, redrawn in
place as today. When it is not — a log file, a pipe, CI — the bar is a :class:`PlainBar`: one
plain line every few seconds and one when it ends, never a carriage return::

    train ty: 1,200/5,000 block-steps (24%), 410 block-step/s, 0:03 elapsed, ~0:09 left [running 4]
    train ty: finished 5,000/5,000 block-steps (100%) in 0:12, 410 block-step/s [done 4]

A bar that ends before its first line is due prints only its final line; one that made no
progress prints nothing.

Environment:

* ``PSM_PROGRESS``: ``auto`` (default: tqdm on a terminal, plain lines elsewhere), ``bar``
  (always tqdm), ``plain`` (always plain lines) or ``off`` (no progress at all, as
  ``--no-progress``).
* ``PSM_PROGRESS_INTERVAL``: seconds between two plain lines of a bar (default 5).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm.auto import tqdm

from .core.progress import Progress
from .errors import PSMError

PROGRESS_ENV = "PSM_PROGRESS"
INTERVAL_ENV = "PSM_PROGRESS_INTERVAL"
MODES = ("auto", "bar", "plain", "off")
DEFAULT_INTERVAL = 5.0
"""Seconds between two plain lines of one bar."""


def progress_mode(stream: TextIO | None = None) -> str:
    """How a bar writing to ``stream`` (default: stderr) shows: ``"bar"`` (tqdm), ``"plain"``
    (lines) or ``"off"``, from ``PSM_PROGRESS`` and, under ``auto``, whether the stream is a
    terminal.

    Raises:
        PSMError: ``PSM_PROGRESS`` is not one of :data:`MODES`.
    """
    raw = os.environ.get(PROGRESS_ENV, "").strip().lower() or "auto"
    if raw not in MODES:
        raise PSMError(
            f"{PROGRESS_ENV}={os.environ[PROGRESS_ENV]!r}: choose from {', '.join(MODES)}"
        )
    if raw != "auto":
        return raw
    stream = sys.stderr if stream is None else stream
    if stream is None:  # no stderr at all (pythonw): nowhere to write
        return "off"
    if _isatty(stream) or _in_notebook():
        return "bar"
    return "plain"


def progress_interval() -> float:
    """Seconds between two plain lines (``PSM_PROGRESS_INTERVAL``, default 5).

    Raises:
        PSMError: a value that is not a positive number.
    """
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise PSMError(f"{INTERVAL_ENV}={raw!r}: expected a positive number of seconds")
    return value


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed file
        return False


def _in_notebook() -> bool:
    """Whether tqdm draws notebook widgets here (an IPython kernel): keep them."""
    if "IPython" not in sys.modules:
        return False
    from tqdm.autonotebook import tqdm as chosen
    from tqdm.std import tqdm as std

    return chosen is not std


def _count(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"


def _rate(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class PlainBar:
    """A progress bar for logs: one plain line every ``interval`` seconds and a final one.

    It takes the part of tqdm's interface psm uses (``update``, ``n``, ``total``, ``refresh``,
    ``set_postfix_str``, ``set_description``, ``close``, ``with``), so code written for a tqdm
    bar drives it unchanged. A line is written (at most once per interval) when the bar moves or
    is refreshed short of its total (the final line reports the total); the rate on it is the
    rate since the previous line. Counts set directly (``bar.n = ...``, as a monitor polling
    files does) are measured from the first refresh, so work done before the bar existed (a
    resumed run) does not inflate the rate.

    Args:
        total: the count at completion (None: unknown, no percentage).
        desc: the label each line starts with.
        unit: what is counted (``"step"``; plural ``"steps"`` on the lines).
        file: where the lines go (default: stderr when the bar is made).
        interval: seconds between lines (default :func:`progress_interval`).
        leave: accepted for tqdm compatibility (the final line is always written).
        initial: the starting count.
    """

    def __init__(
        self,
        total: float | None = None,
        desc: str | None = None,
        unit: str = "it",
        *,
        file: TextIO | None = None,
        interval: float | None = None,
        leave: bool | None = True,
        initial: float = 0,
        **_tqdm_only: Any,
    ) -> None:
        self.total = total
        self.desc = desc or ""
        self.unit = unit
        self.leave = leave
        self.n = initial
        self.postfix = ""
        self.file = file if file is not None else sys.stderr
        self.interval = progress_interval() if interval is None else interval
        self.lines = 0  # lines written so far
        self._t0 = self._last_t = time.monotonic()
        self._n0 = self._last_n = initial
        self._updated = False  # update() seen: counts start from ``initial``
        self._based = False  # the baseline of a directly set count is taken
        self._closed = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ tqdm's interface
    def update(self, n: float = 1) -> None:
        """``n`` more done; a line if one is due."""
        with self._lock:
            self.n += n
            self._updated = True
            self._maybe_line()

    def refresh(self) -> None:
        """A line if one is due (the count may have been set directly)."""
        with self._lock:
            if not self._updated and not self._based:
                self._n0 = self._last_n = self.n
                self._based = True
            self._maybe_line()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """The status shown in brackets at the end of the lines."""
        self.postfix = str(s)
        if refresh:
            self.refresh()

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        """The label lines start with."""
        self.desc = desc or ""
        if refresh:
            self.refresh()

    def close(self) -> None:
        """Write the final line (if the bar moved or wrote before); later calls do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.n != self._n0 or self.lines:
                self._write(self.final_line())

    def __enter__(self) -> PlainBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the lines
    def _units(self) -> str:
        return self.unit if self.unit.endswith("s") else self.unit + "s"

    def _amount(self) -> str:
        if self.total is None:
            return f"{_count(self.n)} {self._units()}"
        pct = 100.0 * self.n / self.total if self.total else 100.0
        return f"{_count(self.n)}/{_count(self.total)} {self._units()} ({pct:.0f}%)"

    def _speed(self, rate: float) -> str:
        """``", 410 step/s"``, or nothing when the unit is seconds (a rate of 1 s/s)."""
        return "" if self.unit == "s" else f", {_rate(rate)} {self.unit}/s"

    def _post(self) -> str:
        return f" [{self.postfix}]" if self.postfix else ""

    def progress_line(self, now: float | None = None) -> str:
        """The line for now: count, percentage, rate since the last line, elapsed, time left."""
        now = time.monotonic() if now is None else now
        dt = now - self._last_t
        rate = (self.n - self._last_n) / dt if dt > 0 else 0.0
        line = f"{self.desc}: {self._amount()}{self._speed(rate)}, {_clock(now - self._t0)} elapsed"
        if self.total is not None and rate > 0 and self.n < self.total:
            line += f", ~{_clock((self.total - self.n) / rate)} left"
        return line + self._post()

    def final_line(self) -> str:
        """The closing line: the count reached, the whole time and the mean rate."""
        elapsed = time.monotonic() - self._t0
        rate = (self.n - self._n0) / elapsed if elapsed > 0 else 0.0
        ended = "finished" if self.total is None or self.n >= self.total else "stopped at"
        return f"{self.desc}: {ended} {self._amount()} in {_clock(elapsed)}{self._speed(rate)}" + (
            self._post()
        )

    def _maybe_line(self) -> None:
        if self._closed:
            return
        now = time.monotonic()
        if now - self._last_t < self.interval:
            return
        if self.total is not None and self.n >= self.total:  # the final line says it
            return
        self._write(self.progress_line(now))
        self._last_t, self._last_n = now, self.n

    def _write(self, line: str) -> None:
        self.lines += 1
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: no progress
            self.file.write(line + "\n")
            self.file.flush()


def make_bar(
    total: float | None = None,
    *,
    desc: str | None = None,
    unit: str = "it",
    leave: bool | None = True,
    disable: bool = False,
    file: TextIO | None = None,
    **tqdm_kwargs: Any,
) -> Any:
    """A progress bar for the stream it writes to: tqdm on a terminal, a :class:`PlainBar`
    elsewhere, a disabled tqdm when ``disable`` or ``PSM_PROGRESS=off`` (see the module).

    Args:
        total, desc, unit, leave, disable, file: as tqdm's.
        **tqdm_kwargs: further tqdm arguments (``unit_scale``, ``bar_format``, ...), used by the
            tqdm bar only.

    Returns:
        A bar with tqdm's ``update``/``n``/``refresh``/``set_postfix_str``/``close``.
    """
    mode = "off" if disable else progress_mode(file)
    if mode == "plain":
        return PlainBar(total, desc, unit, file=file, leave=leave)
    where = {} if file is None else {"file": file}
    return tqdm(
        total=total, desc=desc, unit=unit, leave=leave, disable=mode == "off", **where,
        **tqdm_kwargs,
    )  # fmt: skip


class TqdmProgress:
    """A :class:`~psm.core.progress.Progress` drawn as a bar of :func:`make_bar` (tqdm on a
    terminal, plain lines in a log).

    Args:
        desc: the bar's label (``"NLL"``, ``"sample (ode)"``).
        unit: what the count counts (solver ``"step"`` s).
        leave: keep the finished bar on screen.
    """

    def __init__(self, desc: str, *, unit: str = "step", leave: bool = False) -> None:
        self.desc = desc
        self.unit = unit
        self.leave = leave
        self.bar: Any = None

    def start(self, total: int) -> None:
        self.close()
        self.bar = make_bar(total, desc=self.desc, unit=self.unit, leave=self.leave)

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
    ``enabled`` or ``PSM_PROGRESS=off``; pass it as a core function's ``progress=``."""
    if not enabled or progress_mode() == "off":
        yield None
        return
    bar = TqdmProgress(desc, unit=unit, leave=leave)
    try:
        yield bar
    finally:
        bar.close()
