"""The run folder: the one definition of its files, and every read and write of them.

A run folder holds

- ``config.yaml``: the resolved settings (written when training starts);
- ``metrics.jsonl``: one JSON object per line, each with a ``"kind"`` and a ``"step"``;
- ``checkpoint.pt``: everything needed to resume, with a SHA-256 digest of its content that is
  checked on load, loaded with ``weights_only=True``;
- ``initial.pt``: the model's weights at step 0 (dense tensors, zeros where inactive, on any
  backend), for the loss along the line from initialisation to solution (``sparsetrain
  analyze``);
- ``summary.json``: the results, written when the run is finished;
- ``train.log``: the messages of a run trained by a sweep;
- ``tensorboard/``: TensorBoard event files, with ``--tensorboard`` (see ``tensorboard.py``);
- ``.sparsetrain.lock``: the lock of the process training in it (see ``lock.py``).

Every file but the appended metrics and log is written atomically: to a new temporary file
beside it (``mkstemp``: a fresh name, created exclusively, never through a link), flushed to
disk, then renamed over the old one. A reader, or a process killed at any instant, sees the old
file or the new one, never half of one. A write that fails (a full disk) removes its temporary
file and leaves the old file as it was; the temporary files of a killed writer are removed by
the next process that locks the folder.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..files import TMP_SUFFIX, replace_atomically

from .config import ConfigError, TrainConfig, dump_yaml, saved_setting
from .lock import LOCK, FolderLock  # noqa: F401 (LOCK: one of the folder's file names)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
INITIAL = "initial.pt"
SUMMARY = "summary.json"
TRAIN_LOG = "train.log"
TENSORBOARD = "tensorboard"
#: The ``"format"`` entry of a run checkpoint.
FORMAT = "sparsetrain-run"
#: The key of a checkpoint's digest of the rest of its content.
DIGEST = "sha256"
_TMP = TMP_SUFFIX
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class RunFolderError(ConfigError):
    """A file of a run folder cannot be written or read; the message names it and says what to
    do."""


def run_folder(config: TrainConfig) -> Path:
    """Where a run writes: ``out`` if given, else ``runs_dir / config.run_name()``."""
    return Path(config.out) if config.out else Path(config.runs_dir) / config.run_name()


def claim(folder: Path) -> FolderLock:
    """Lock ``folder`` for this process (``FolderInUse`` if another holds it) and remove the
    temporary files a killed writer left there (no other process writes in a locked folder)."""
    lock = FolderLock(folder).acquire()
    for path in Path(folder).iterdir():
        if _is_temporary(path.name):
            path.unlink(missing_ok=True)
    return lock


def _is_temporary(name: str) -> bool:
    # ours: ".<file>.<random>.tmp"; earlier versions: ".<file>.tmp-<pid>"
    return name.startswith(".") and (name.endswith(_TMP) or ".tmp-" in name)


# --- writing ------------------------------------------------------------------------------
def _write_error(path: Path, exc: OSError, size: int) -> RunFolderError:
    folder = path.parent
    kept = f"; the previous {path.name} is intact" if path.exists() else ""
    if exc.errno in _FULL:
        try:
            free = f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free, "
        except OSError:
            free = ""
        return RunFolderError(
            f"cannot write {path}: the disk is full or a size limit was reached ({free}"
            f"{size / 1e6:.1f} MB needed){kept}; free some space, then continue with "
            f"--resume {folder}")
    return RunFolderError(f"cannot write {path}: {exc.strerror or exc}{kept}; make {folder} "
                          "writable or use another folder")


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Replace ``path`` by a file holding ``data``, atomically (see the module's docstring);
    raises ``RunFolderError`` (the old file intact, no temporary file left) if it fails."""
    try:
        replace_atomically(Path(path), data)
    except OSError as exc:
        raise _write_error(Path(path), exc, len(data)) from None


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(Path(path), buffer.getbuffer())


def atomic_write_json(obj: Any, path: Path) -> None:
    """``obj`` as indented JSON (with a final newline) to ``path``, atomically."""
    write_atomically(Path(path), (json.dumps(obj, indent=2) + "\n").encode())


def _append_line(path: Path, line: str) -> None:
    """Append ``line`` to ``path`` (created if missing; never through a link)."""
    data = (line + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _write_error(Path(path), exc, len(data)) from None


# --- settings -----------------------------------------------------------------------------
def config_path(folder: Path) -> Path:
    return Path(folder) / CONFIG


def save_config(folder: Path, config: TrainConfig) -> None:
    """Write the run's resolved settings as ``config.yaml``, atomically."""
    write_atomically(config_path(folder), dump_yaml(config).encode())


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a run, finished (``summary.json``) or not (``config.yaml``)."""
    return is_finished(folder) or config_path(folder).is_file()


def find_run_folders(root: Path) -> list[Path]:
    """The run folders below ``root`` (those holding a ``config.yaml``), sorted."""
    return sorted({p.parent for p in Path(root).rglob(CONFIG)})


# --- metrics ------------------------------------------------------------------------------
def append_metrics(folder: Path, record: dict[str, Any]) -> None:
    """Add ``record`` as one line of ``metrics.jsonl``."""
    _append_line(Path(folder) / METRICS, json.dumps(record))


def append_log(folder: Path, message: str) -> None:
    """Add ``message`` to ``train.log``."""
    _append_line(Path(folder) / TRAIN_LOG, message)


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl`` in order (none if it is missing); a line that is not
    JSON (cut short by an interruption) is skipped."""
    path = Path(folder) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_bytes().decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_metrics(folder: Path, step: int) -> None:
    """Keep only the lines of ``metrics.jsonl`` logged up to ``step`` (a resumed run logs the
    later ones again), atomically; lines that are not JSON objects are dropped too."""
    path = Path(folder) / METRICS
    if not path.exists():
        return
    kept = [json.dumps(r) for r in read_metrics(folder)
            if isinstance(r.get("step", 0), (int, float)) and r.get("step", 0) <= step]
    write_atomically(path, "".join(k + "\n" for k in kept).encode())


def start_afresh(folder: Path) -> None:
    """Remove the metrics, summary and TensorBoard files of a run that never wrote a checkpoint
    (killed before its first one), so that a run started again in the folder begins with fresh
    files."""
    for name in (METRICS, SUMMARY, INITIAL):
        (Path(folder) / name).unlink(missing_ok=True)
    shutil.rmtree(Path(folder) / TENSORBOARD, ignore_errors=True)


# --- checkpoint ---------------------------------------------------------------------------
def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / CHECKPOINT).exists()


def content_digest(content: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's content (everything but its digest): keys, plain values, and
    each tensor's dtype, shape and bytes, in a fixed order."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in content.items() if k != DIGEST})
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"{{{len(obj)}:".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode() + b"=")
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}:".encode())
        for item in obj:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def save_checkpoint(folder: Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` (a dict with ``"format": FORMAT``) as ``checkpoint.pt``, with the
    digest of its content, atomically."""
    atomic_save({**checkpoint, DIGEST: content_digest(checkpoint)}, Path(folder) / CHECKPOINT)


def load_checkpoint(folder: Path, config: TrainConfig,
                    changed: Iterable[str] = ()) -> dict[str, Any]:
    """The checkpoint of ``folder``, loaded on the CPU with ``weights_only=True``.

    Raises ``ConfigError`` when there is none, when it cannot be read (truncated, damaged), when
    its content does not match its digest (changed after it was written), when it is not a run
    checkpoint, or when it was written with other semantic settings than ``config``, except
    those named in ``changed`` (the message lists each difference).
    """
    folder = Path(folder)
    path = folder / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"nothing to resume in {folder}: it has no {CHECKPOINT}")
    damaged = (f"checkpoint {path} is damaged; restore it from a copy, or start the run again "
               "in a new folder")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise ConfigError(f"{damaged} (it cannot be read: it is not a torch checkpoint "
                          "archive; it may be truncated)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise ConfigError(f"{damaged} (it cannot be read: its data is not valid)") from None
        # what weights_only refuses; never suggest loading it without
        raise ConfigError(f"{path} holds objects other than tensors and plain values, which "
                          "sparsetrain never loads (it never unpickles code), so it was not "
                          "written by sparsetrain or was altered; start the run again in a new "
                          "folder") from None
    except Exception as exc:  # torch raises several kinds for damaged files
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ConfigError(f"{damaged} (it cannot be read: {type(exc).__name__}"
                          f"{': ' + detail if detail else ''})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a sparsetrain run checkpoint")
    digest = checkpoint.get(DIGEST)  # checkpoints of earlier versions have none
    if digest is not None and digest != content_digest(checkpoint):
        raise ConfigError(f"{damaged} (its content does not match its SHA-256 digest)")
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{damaged} (it has no settings)")
    skip = set(changed)
    # a setting added since the checkpoint was written had its default value then
    differs = sorted(k for k, v in config.semantic_dict().items()
                     if k not in skip and saved_setting(saved, k) != v)
    if differs:
        details = ", ".join(f"{k}: saved {saved_setting(saved, k)!r}, now "
                            f"{getattr(config, k)!r}"
                            for k in differs)
        raise ConfigError(f"{path} is from a different configuration ({details}); resume "
                          "with the run's own settings or start a new run folder")
    return checkpoint


# --- initial weights ----------------------------------------------------------------------
def save_initial(folder: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Write the model's weights at step 0 (a state dict of tensors) as ``initial.pt``."""
    atomic_save({"format": FORMAT + "-initial", "model": dict(state)}, Path(folder) / INITIAL)


def load_initial(folder: Path) -> dict[str, torch.Tensor] | None:
    """The weights at step 0 (loaded with ``weights_only=True``), or ``None`` when the run has
    no ``initial.pt`` (runs trained before it was written); ``RunFolderError`` when it cannot
    be read."""
    path = Path(folder) / INITIAL
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # damaged, truncated, or holding more than tensors
        raise RunFolderError(f"{path} cannot be read ({type(exc).__name__}); delete it (only "
                             "the analysis of the line from initialisation needs it)") from None
    if not (isinstance(saved, dict) and saved.get("format") == FORMAT + "-initial"
            and isinstance(saved.get("model"), dict)):
        raise RunFolderError(f"{path} is not the initial weights of a sparsetrain run; delete it")
    return saved["model"]


# --- summary ------------------------------------------------------------------------------
def is_finished(folder: Path) -> bool:
    """Whether the run in ``folder`` is finished: it has its ``summary.json``."""
    return (Path(folder) / SUMMARY).is_file()


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json``, atomically."""
    atomic_write_json(summary, Path(folder) / SUMMARY)


def read_summary(folder: Path) -> dict[str, Any] | None:
    """The run's summary, or ``None`` when it is not finished; ``RunFolderError`` when the file
    is not a JSON object."""
    path = Path(folder) / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        summary = exc
    if not isinstance(summary, dict):
        raise RunFolderError(f"{path} is not a run summary (a JSON object); delete it and run "
                             f"sparsetrain train --resume {folder} to write it again")
    return summary
