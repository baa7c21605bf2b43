"""A progress bar for training, fed by the block status files on disk.

It works the same for every executor (in-process, worker processes, Ray tasks, SLURM jobs on a
shared file system): workers write ``blocks/NNNN.json`` as they go, the driver polls them.
"""

from __future__ import annotations

import threading
from typing import Any

from ..progress import make_bar
from ..runs.run import Run


class ProgressMonitor:
    """Context manager showing block-steps done of ``blocks`` until it exits.

    Args:
        run: the run.
        blocks: the blocks being trained.
        enabled: False shows nothing.
        interval: seconds between polls.
        desc: bar label.
    """

    def __init__(
        self,
        run: Run,
        blocks: list[int],
        *,
        enabled: bool = True,
        interval: float = 0.5,
        desc: str | None = None,
    ) -> None:
        self.run, self.blocks, self.enabled, self.interval = run, blocks, enabled, interval
        self.desc = desc or f"train {run.config.name}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None  # a psm.progress.make_bar bar

    @property
    def _budget(self) -> float | None:
        """The per-block time budget when it, not the step target, ends the blocks."""
        return self.run.config.train.max_seconds

    def _poll(self) -> None:
        assert self._bar is not None
        statuses = self.run.ledger.statuses(self.blocks)
        budget = self._budget
        if budget is not None:  # time-budgeted: the bar counts seconds, steps go to the postfix
            self._bar.n = round(sum(min(s.wall_time, budget) for s in statuses) / len(statuses))
        else:
            self._bar.n = sum(min(s.step, s.target) for s in statuses)
        counts: dict[str, int] = {}
        for s in statuses:
            counts[s.state] = counts.get(s.state, 0) + 1
        shown = [f"{k} {counts[k]}" for k in ("done", "running", "failed") if counts.get(k)]
        if budget is not None:
            shown.insert(0, f"{sum(s.step for s in statuses):,} block-steps")
        self._bar.set_postfix_str(", ".join(shown), refresh=False)
        self._bar.refresh()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __enter__(self) -> ProgressMonitor:
        if self.enabled:
            fmt = None
            if self._budget is not None:  # seconds of the budget; no meaningless "s/s" rate
                total, unit, scale = round(self._budget), "s", False
                fmt = "{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s "
                fmt += "[{elapsed}<{remaining}{postfix}]"
            else:
                total = sum(self.run.config.step_target(b) for b in self.blocks)
                unit, scale = "block-step", True
            self._bar = make_bar(
                total, desc=self.desc, unit=unit, unit_scale=scale, dynamic_ncols=True,
                bar_format=fmt,
            )  # fmt: skip
            self._poll()
            self._thread = threading.Thread(target=self._loop, daemon=True, name="psm-progress")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._bar is not None:
            self._poll()
            self._bar.close()
