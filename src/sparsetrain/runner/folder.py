"""The run folder: the one definition of its files, and every read and write of them.

A run folder holds

- ``config.yaml``: the resolved settings (written when training starts);
- ``metrics.jsonl``: one JSON object per line, each with a ``"kind"`` and a ``"step"``;
- ``checkpoint.pt``: everything needed to resume, written atomically, loaded with
  ``weights_only=True``;
- ``summary.json``: the results, written atomically when the run is finished;
- ``train.log``: the messages of a run trained by a sweep.

Atomic writes go to a hidden temporary file beside the target and replace it in one
``os.replace``, so a reader (or an interrupted run) sees the old file or the new one, never
half of one, and no temporary file is left behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ConfigError, TrainConfig, save_yaml

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
TRAIN_LOG = "train.log"
#: The ``"format"`` entry of a run checkpoint.
FORMAT = "sparsetrain-run"


def run_folder(config: TrainConfig) -> Path:
    """Where a run writes: ``out`` if given, else ``runs_dir / config.run_name()``."""
    return Path(config.out) if config.out else Path(config.runs_dir) / config.run_name()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # the write failed: leave no partial file
            tmp.unlink()


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    _atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_write_json(obj: Any, path: Path) -> None:
    """``obj`` as indented JSON (with a final newline) to ``path``, atomically."""
    _atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


# --- settings -----------------------------------------------------------------------------
def config_path(folder: Path) -> Path:
    return Path(folder) / CONFIG


def save_config(folder: Path, config: TrainConfig) -> None:
    """Write the run's resolved settings as ``config.yaml``."""
    save_yaml(config, config_path(folder))


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a run, finished (``summary.json``) or not (``config.yaml``)."""
    return is_finished(folder) or config_path(folder).is_file()


def find_run_folders(root: Path) -> list[Path]:
    """The run folders below ``root`` (those holding a ``config.yaml``), sorted."""
    return sorted({p.parent for p in Path(root).rglob(CONFIG)})


# --- metrics ------------------------------------------------------------------------------
def append_metrics(folder: Path, record: dict[str, Any]) -> None:
    """Add ``record`` as one line of ``metrics.jsonl``."""
    with open(Path(folder) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl`` in order (none if it is missing); a line that is not
    JSON (cut short by an interruption) is skipped."""
    path = Path(folder) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(folder: Path, step: int) -> None:
    """Keep only the lines of ``metrics.jsonl`` logged up to ``step`` (a resumed run logs the
    later ones again); lines that are not JSON are dropped too."""
    path = Path(folder) / METRICS
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the interruption
    path.write_text("".join(k + "\n" for k in kept))


# --- checkpoint ---------------------------------------------------------------------------
def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / CHECKPOINT).exists()


def save_checkpoint(folder: Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` (a dict with ``"format": FORMAT``) as ``checkpoint.pt``."""
    atomic_save(checkpoint, Path(folder) / CHECKPOINT)


def load_checkpoint(folder: Path, config: TrainConfig) -> dict[str, Any]:
    """The checkpoint of ``folder``, loaded on the CPU with ``weights_only=True``.

    Raises ``ConfigError`` when there is none, when it cannot be read (truncated, damaged),
    when it is not a run checkpoint, or when it was written with other semantic settings than
    ``config`` (the message lists each difference).
    """
    folder = Path(folder)
    path = folder / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"nothing to resume in {folder}: it has no {CHECKPOINT}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for damaged files
        raise ConfigError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); it may be "
                          "truncated or not a sparsetrain checkpoint") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a sparsetrain run checkpoint")
    saved = checkpoint.get("config", {})
    differs = sorted(k for k, v in config.semantic_dict().items() if saved.get(k) != v)
    if differs:
        details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {getattr(config, k)!r}"
                            for k in differs)
        raise ConfigError(f"{path} is from a different configuration ({details}); resume "
                          "with the run's own settings or start a new run folder")
    return checkpoint


# --- summary ------------------------------------------------------------------------------
def is_finished(folder: Path) -> bool:
    """Whether the run in ``folder`` is finished: it has its ``summary.json``."""
    return (Path(folder) / SUMMARY).is_file()


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json``, atomically."""
    atomic_write_json(summary, Path(folder) / SUMMARY)


def read_summary(folder: Path) -> dict[str, Any] | None:
    """The run's summary, or ``None`` when it is not finished."""
    path = Path(folder) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None
