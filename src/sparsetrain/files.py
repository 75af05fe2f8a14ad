"""Writing a file atomically: to a new temporary file beside it (``mkstemp``: a fresh name,
created exclusively, never through a link), flushed to disk, then renamed over the old one. A
reader, or a process killed at any instant, sees the old file or the new one, never half of
one; a write that fails removes its temporary file and leaves the old file as it was."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: The suffix of the temporary files (``.<name>.<random>.tmp`` beside the file).
TMP_SUFFIX = ".tmp"


def replace_atomically(path: Path, data: bytes | memoryview) -> None:
    """Replace ``path`` by a file holding ``data``, atomically; an ``OSError`` leaves the old
    file intact and no temporary file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
