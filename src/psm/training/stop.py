"""Clean stops: Ctrl-C or SIGTERM ask the training loop to checkpoint and return."""

from __future__ import annotations

import signal


class StopRequest:
    """Set by SIGINT (Ctrl-C) or SIGTERM (cluster pre-emption, ``kill``) while installed.

    Training loops poll :meth:`is_set` between steps and save an exact checkpoint, so a stop
    never lands in the middle of an optimizer step. A second Ctrl-C raises KeyboardInterrupt.
    """

    def __init__(self) -> None:
        self._set = False
        self._old: dict[int, object] = {}

    def is_set(self) -> bool:
        return self._set

    def _handle(self, signum, frame) -> None:
        if self._set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._set = True

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old.clear()
