"""Turns SIGTERM and SIGINT into a request to checkpoint and stop at the next step boundary."""

from __future__ import annotations

import signal
import threading
import types

from absl import logging


class StopRequest:
    """Context manager: while active, SIGTERM/SIGINT set `requested` instead of killing the process.

    A second signal of the same kind restores the default behaviour, so pressing Ctrl-C twice still stops at once.
    Only the main thread can install signal handlers; elsewhere this is a no-op that never requests a stop.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        """Creates the (inactive) guard."""
        self._event = threading.Event()
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """True once a stop signal has arrived."""
        return self._event.is_set()

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self._event.is_set():  # Second signal: give up waiting for the step boundary.
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        logging.warning("received %s: saving a checkpoint at the end of this step, then stopping", self.signal_name)
        self._event.set()

    def __enter__(self) -> StopRequest:
        """Installs the handlers (main thread only)."""
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        """Restores the previous handlers."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
