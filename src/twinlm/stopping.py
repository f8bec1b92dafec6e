"""SIGINT/SIGTERM as a request to stop cleanly, for a whole command and for the training engine alike.

A command that runs many things (evaluate's fine-tuning cells, ablate's runs and measurements) holds
`stop_on_signal()` for its whole duration and calls `check_stop()` between them; the engine's StopSignal
component reads the same flag after every step. So a signal at any moment stops the whole command: the
run in progress saves a checkpoint and returns, finished runs and cells stay as they are, and the command
raises `Interrupted` (exit status 128 + signal). A second Ctrl-C stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twinlm.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StopFlag:
    """The process-wide flag; handlers are installed by the outermost holder and restored by it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.depth = 0
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def enter(self) -> None:
        if self.depth == 0:
            self.signum = None
            for sig in SIGNALS:
                try:
                    self.previous[sig] = signal.signal(sig, self.handle)
                except ValueError:  # not the main thread: no handlers, no clean stop
                    pass
        self.depth += 1

    def exit(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.previous.clear()
            self.signum = None


STOP = _StopFlag()


@contextmanager
def stop_on_signal() -> Iterator[None]:
    """While held, SIGINT/SIGTERM only set the stop flag (read by `check_stop` and the engine)."""
    STOP.enter()
    try:
        yield
    finally:
        STOP.exit()


def stop_requested() -> int | None:
    """The signal number received since the outermost `stop_on_signal()` began, if any."""
    return STOP.signum


def check_stop(resume_hint: str) -> None:
    """Raise `Interrupted` when a stop was requested; `resume_hint` says what is kept and how to go on."""
    if STOP.signum is not None:
        raise_interrupted(STOP.signum, resume_hint)


def raise_interrupted(signum: int | str, resume_hint: str) -> None:
    """Raise `Interrupted` for a signal number or name (a run summary's `interrupted_by`)."""
    number = int(getattr(signal, signum)) if isinstance(signum, str) else int(signum)
    raise Interrupted(number, f"interrupted by {signal.Signals(number).name}: {resume_hint}")


__all__ = ["STOP", "check_stop", "raise_interrupted", "stop_on_signal", "stop_requested"]
