"""Byte-level text for language modelling: ``load_text(data_dir, context=128)``.

The corpus is the bytes of one or more files, concatenated in a fixed order:

- ``data_dir`` a file: that file;
- ``data_dir`` a folder: every regular file below it (recursively, symbolic links to folders not
  followed, hidden files and folders skipped) whose name matches ``pattern`` (a shell glob,
  ``"*.txt"`` by default), sorted by their path relative to the folder (compared part by part),
  so the corpus is the same on every machine;
- several of these, joined with ``os.pathsep`` (``a.txt:notes/`` on Linux), or a list in
  Python: each in turn, in the order given;
- ``None``: the **default corpus**, which every machine with Python has: the ``.py`` files of
  the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``) in that
  sorted order, without test suites and installed packages (folders named ``test``, ``tests``,
  ``idle_test``, ``site-packages``, ``dist-packages``, ``__pycache__``), cut at
  ``DEFAULT_MAX_BYTES`` = 1 MiB (1,048,576 bytes; on CPython 3.11 the first 1 MiB reaches from
  ``__future__.py`` into ``asyncio/``). It depends on the Python version, so the data set
  records the version and a SHA-256 of the corpus bytes in ``info``, which the runner writes
  into every summary.

``max_bytes`` cuts any corpus to its first ``max_bytes`` bytes (the default corpus at 1 MiB
unless given; a corpus given by ``data_dir`` is read whole unless given).

**Split.** The last ``validation_fraction`` (10% by default) of the corpus bytes are held out
for validation (the data set's ``test_*`` tensors), the rest is for training. A byte split
rather than a split by files gives the same fraction whatever the files' sizes (a single file
works as well as a folder of many), and since the corpus is in sorted order, the validation
bytes are the files at its end, which training never sees; only the file that straddles the
boundary is shared, its first part trained on and the rest held out.

**Examples.** Each part is cut into non-overlapping sequences of ``context`` bytes (a remainder
shorter than a sequence is dropped); the targets are the same bytes shifted by one, the next
byte at every position, so a sequence of ``context`` bytes is ``context`` predictions over a
vocabulary of 256 (``num_classes``). The default corpus gives 7,372 training and 819 validation
sequences of 128 bytes. Inputs and targets are views of one uint8 tensor of the corpus and are
turned into int64 batch by batch (``prepare``, ``prepare_targets``).

Bad input (a path that does not exist or cannot be read, a folder with no matching files, an
empty corpus, or one too small for a training and a validation sequence) raises a
``DataFileError`` that names the path and says what to do.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import torch

from .. import checks
from .datasets import Dataset
from .idx import DataFileError

VOCABULARY = 256
DEFAULT_CONTEXT = 128
DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_VALIDATION_FRACTION = 0.1
DEFAULT_PATTERN = "*.txt"
#: Folders of the standard library left out of the default corpus.
EXCLUDED_STDLIB_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages",
                                     "dist-packages", "__pycache__"})
MAX_CONTEXT = 1 << 16


@dataclass
class TextDataset(Dataset):
    """Sequences of bytes and their next bytes (``kind == "sequence"``): ``train_x`` and
    ``train_y`` are (sequences, context) uint8 views of the corpus, as are ``test_x`` and
    ``test_y`` (the validation part)."""

    kind: ClassVar[str] = "sequence"

    def prepare(self, x: torch.Tensor, *, train: bool, augment: bool | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """A batch of byte sequences as int64 token indices (there is no augmentation)."""
        if augment:
            raise ValueError(f"{self.name}: byte sequences have no augmentation; leave "
                             "--augment out")
        return x.long()

    def prepare_targets(self, y: torch.Tensor) -> torch.Tensor:
        return y.long()


def load_text(data_dir: str | Path | Sequence[str | Path] | None = None, *,
              context: int = DEFAULT_CONTEXT, max_bytes: int | None = None,
              validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
              pattern: str = DEFAULT_PATTERN) -> TextDataset:
    """The byte-level text data set of ``data_dir`` (see the module's docstring)."""
    context = checks.positive_int(context, "text: context", high=MAX_CONTEXT,
                                  fix="context is the number of bytes of a sequence, e.g. 128")
    if max_bytes is not None:
        max_bytes = checks.positive_int(max_bytes, "text: max_bytes",
                                        fix="max_bytes cuts the corpus to its first bytes")
    fraction = checks.real_in_range(validation_fraction, "text: validation_fraction", 0.0, 1.0,
                                    low_open=True, high_open=True,
                                    meaning="the fraction of the corpus held out")
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"text: pattern must be a file-name glob such as '*.txt', got "
                         f"{checks.shown(pattern)}")
    if data_dir is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _files_below(root, "*.py", EXCLUDED_STDLIB_FOLDERS)
        where = f"the Python {platform.python_version()} standard library in {root}"
        if not files:
            raise DataFileError(f"text: no .py files in {where}; pass a text file or folder "
                                "as --data-dir")
        limit = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    else:
        paths = _split_paths(data_dir)
        files = [f for path in paths for f in _files_of(path, pattern)]
        where = ", ".join(map(str, paths))
        limit = max_bytes
    corpus, used = _read(files, limit)
    if not corpus:
        raise DataFileError(f"text: the corpus of {where} is empty (its files hold no bytes); "
                            "pass files with text in them as --data-dir")
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
    split = len(data) - int(round(fraction * len(data)))
    train_x, train_y = _sequences(data[:split], context)
    test_x, test_y = _sequences(data[split:], context)
    if len(train_x) == 0 or len(test_x) == 0:
        need = (context + 1) * max(1 / fraction, 1 / (1 - fraction))
        raise DataFileError(
            f"text: the corpus of {where} holds {len(data):,} bytes, too few for a training and "
            f"a validation sequence of {context} bytes (validation_fraction {fraction:g}, about "
            f"{need:,.0f} bytes needed); give a larger corpus or a smaller context "
            "(--data-option context=N)")
    info = {
        "corpus": "default: Python standard library (.py)" if data_dir is None else "files",
        "source": where,
        "files": used,
        "bytes": len(data),
        "sha256": hashlib.sha256(corpus).hexdigest(),
        "python": platform.python_version(),
        "context": context,
        "validation_fraction": fraction,
        "train_bytes": split,
        "validation_bytes": len(data) - split,
        "train_sequences": len(train_x),
        "validation_sequences": len(test_x),
    }
    return TextDataset("text", train_x, train_y, test_x, test_y, VOCABULARY,
                       torch.zeros(1), torch.ones(1), info=info)


def _sequences(part: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping sequences of ``part`` and their next bytes, views of it."""
    n = max(0, (len(part) - 1) // context)
    return part[:n * context].view(n, context), part[1:n * context + 1].view(n, context)


def _split_paths(data_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(data_dir, (str, os.PathLike)):
        items = [data_dir] if isinstance(data_dir, os.PathLike) else data_dir.split(os.pathsep)
    else:
        items = list(data_dir)
    paths = [Path(p) for p in items if str(p) != ""]
    if not paths:
        raise DataFileError("text: --data-dir names no path; give a text file or a folder")
    return paths


def _files_of(path: Path, pattern: str) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = _files_below(path, pattern, frozenset())
        if not files:
            raise DataFileError(f"text: {path} holds no files matching {pattern!r} (hidden ones "
                                "aside); choose another with --data-option pattern='*.py', or "
                                "pass a file")
        return files
    if path.exists():
        raise DataFileError(f"text: {path} is not a regular file or a folder; pass a text file "
                            "or a folder of them as --data-dir")
    raise DataFileError(f"text: {path} does not exist; pass a text file or a folder of them as "
                        "--data-dir, or leave --data-dir out for the default corpus")


def _files_below(root: Path, pattern: str, excluded: frozenset[str]) -> list[Path]:
    """Regular files below ``root`` whose name matches ``pattern``, outside hidden and
    ``excluded`` folders, in sorted order of their relative path's parts."""
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=False):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in excluded]
        for name in names:
            path = Path(folder) / name
            if (not name.startswith(".") and fnmatch.fnmatchcase(name, pattern)
                    and path.is_file()):
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _read(files: list[Path], limit: int | None) -> tuple[bytes, int]:
    """The first ``limit`` bytes (all without one) of ``files`` in turn, and how many files
    were read."""
    parts, total, used = [], 0, 0
    for path in files:
        if limit is not None and total >= limit:
            break
        try:
            with open(path, "rb") as f:
                block = f.read(-1 if limit is None else limit - total)
        except OSError as exc:
            raise DataFileError(f"text: cannot read {path}: {exc.strerror or exc}; make it "
                                "readable or leave it out of --data-dir") from None
        parts.append(block)
        total += len(block)
        used += 1
    return b"".join(parts), used
