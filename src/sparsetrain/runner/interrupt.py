"""Stopping a run cleanly: a request to stop after the current step, and Ctrl-C asking for it."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class StopRequest:
    """Whether the run should stop after the current step (``requested``). The training loop
    reads it after every step; ``request()`` or a first Ctrl-C inside ``catching_ctrl_c()``
    sets it."""

    def __init__(self, log: Callable[[str], None]):
        self.requested = False
        self.log = log

    def request(self) -> None:
        self.requested = True

    @contextmanager
    def catching_ctrl_c(self) -> Iterator[None]:
        """Within: a first Ctrl-C requests the stop, a second raises ``KeyboardInterrupt`` at
        once. The previous handler is put back on leaving. Off the main thread (where signal
        handlers cannot be set) nothing is caught."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.requested = True
            self.log("\ninterrupted: finishing this step and writing a checkpoint "
                     "(Ctrl-C again to stop at once)")

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
