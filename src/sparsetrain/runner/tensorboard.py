"""TensorBoard logging of a run (``--tensorboard``): event files in ``<run folder>/tensorboard/``.

Written by rank 0 through ``torch.utils.tensorboard.SummaryWriter``, at the step of each
``metrics.jsonl`` line:

- every ``log_every`` steps: ``train/loss``, ``train/accuracy`` (per prediction: per example,
  or per byte on text), ``train/lr``, ``density/overall`` and ``density/<weight name>`` for
  every sparsifiable weight;
- every epoch: ``eval/loss`` (nats per prediction: per byte on text), ``eval/accuracy``,
  ``eval/bits_per_byte`` on text, ``density/overall`` and ``density/ever_active`` (the
  fraction of the sparsified weights active at some point so far).

A resumed run writes a new event file and purges the events of the old ones after its
checkpoint's step (they are logged again), as ``metrics.jsonl`` is cut back; a run started
afresh in its folder removes the old files (``folder.start_afresh``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError
from .folder import TENSORBOARD as FOLDER
INSTALL = "pip install 'sparsetrain[tensorboard]'"


def _writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"--tensorboard needs the tensorboard package: {INSTALL}") from None
    return SummaryWriter


def check_available() -> None:
    """``ConfigError`` (saying how to install it) when the tensorboard package is missing."""
    _writer_class()


class TensorBoardLog:
    """The run's event files in ``folder / FOLDER``; ``start_step``: the step of the
    checkpoint the run continues from (events of later steps already written are purged)."""

    def __init__(self, folder: Path, start_step: int = 0):
        self.path = Path(folder) / FOLDER
        self._writer = _writer_class()(log_dir=str(self.path),
                                       purge_step=start_step + 1 if start_step else None)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Each ``tag: value`` at ``step`` (``None`` values are skipped)."""
        for tag, value in values.items():
            if value is not None:
                self._writer.add_scalar(tag, float(value), step)

    def densities(self, step: int, layers: Mapping[str, float]) -> None:
        """The density of every layer, as ``density/<name>``."""
        self.scalars(step, {f"density/{name}": d for name, d in layers.items()})

    def close(self) -> None:
        self._writer.close()
