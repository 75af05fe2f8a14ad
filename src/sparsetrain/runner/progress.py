"""The per-epoch progress bar: tqdm on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
from typing import Any, Callable


class NoBar:
    """A progress bar that shows nothing (the calls the training loop makes, doing nothing)."""

    def __init__(self, **_: Any):
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool) -> Callable[..., Any]:
    """A factory of bars (``make(total=..., initial=..., desc=...)``): tqdm bars when
    ``enabled`` and stderr is a terminal, else ``NoBar``."""
    if not enabled or not sys.stderr.isatty():
        return NoBar
    from tqdm import tqdm

    def make(**kwargs):
        return tqdm(leave=False, dynamic_ncols=True, **kwargs)

    return make
