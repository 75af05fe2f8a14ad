"""An exclusive lock on a run folder, held by the one process that writes in it.

``flock`` on a lock file in the folder: the operating system releases it when its holder exits
in any way (``kill -9`` included), so a lock left by a dead process is simply taken over, and
two processes can never both hold it. The file keeps the holder's process id, to name it to a
process that finds the folder in use. The file itself is never removed (removing it would let a
third process lock a new file while the second still waits on the old one).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .config import ConfigError

LOCK = ".sparsetrain.lock"


class FolderInUse(ConfigError):
    """Another process holds the folder's lock."""

    def __init__(self, folder: Path, pid: int | None):
        self.folder, self.pid = folder, pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"{folder} is in use by {holder}; wait for it to finish (or stop it), "
                         "or pass another folder")


class FolderLock:
    """The lock of ``folder`` (created if missing). ``acquire()`` takes it or raises
    ``FolderInUse``; ``release()`` gives it back. Also a context manager."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderInUse(self.folder, holder) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a lock never outlives the object that holds it
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except (OSError, UnicodeDecodeError):
        return None


def holder(folder: str | Path) -> int | None:
    """The process id recorded in ``folder``'s lock file (the holder, if it is held)."""
    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_pid(fd)
    finally:
        os.close(fd)
