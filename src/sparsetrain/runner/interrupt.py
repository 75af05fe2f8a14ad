"""Stopping a run cleanly: a request to stop after the current step, and the signals asking it.

SIGINT (Ctrl-C), SIGTERM (what Slurm, Kubernetes and ``timeout`` send before killing) and
SIGHUP (a closed terminal) all ask the run to finish its step, write a checkpoint and exit with
status ``128 + signal`` (130, 143, 129). A second Ctrl-C stops at once; a repeated SIGTERM or
SIGHUP changes nothing (schedulers may send one to every process of a job, and a launcher
passes it on as well).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

#: The signals that ask for a clean stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def exit_status(signum: int | None) -> int:
    """The exit status of a run stopped by signal ``signum`` (130 when not by a signal)."""
    return 128 + int(signum or signal.SIGINT)


@contextmanager
def handling(stop_signals: dict[int, Callable[[int], None]]) -> Iterator[None]:
    """Within: each signal in ``stop_signals`` calls its handler with the signal number; the
    previous handlers are put back on leaving. Off the main thread (where handlers cannot be
    set) nothing is caught."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in stop_signals}
    for signum, handler in stop_signals.items():
        signal.signal(signum, lambda s, frame, h=handler: h(s))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class StopRequest:
    """Whether the run should stop after the current step (``requested``) and which signal
    asked (``signum``; ``None`` for ``request()``). The training loop reads it after every
    step."""

    def __init__(self, log: Callable[[str], None]):
        self.requested = False
        self.signum: int | None = None
        self.log = log

    def request(self, signum: int | None = None) -> None:
        if not self.requested:
            self.signum = signum
        self.requested = True

    def _on_signal(self, signum: int) -> None:
        if self.requested:
            if signum == signal.SIGINT:  # Ctrl-C twice: stop now
                raise KeyboardInterrupt
            return
        self.request(signum)
        how = "Ctrl-C again to stop at once" if signum == signal.SIGINT else "stopping cleanly"
        self.log(f"\n{signal.Signals(signum).name}: finishing this step and writing a "
                 f"checkpoint ({how})")

    @contextmanager
    def catching_signals(self) -> Iterator[None]:
        """Within: SIGINT, SIGTERM and SIGHUP request the stop (see the module's docstring)."""
        with handling({s: self._on_signal for s in STOP_SIGNALS}):
            yield
