"""One process per directory: an exclusive advisory lock on `<dir>/.lock` (flock), held while the process runs.

Two devices on one `--state`, or two servers on one `--store`, would overwrite each other's files; the
second one is refused at start with a message naming the holder. The kernel drops the lock when the
process dies, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".lock"


class DirectoryBusy(RuntimeError):
    """Another process holds the directory's lock; the message names it."""


class DirLock:
    """Holds `<directory>/.lock` exclusively until `release()` (or process exit)."""

    def __init__(self, directory: str | os.PathLike, owner: str, *, shared: bool = False) -> None:
        """`shared`: several cooperating processes may hold it together (server replicas on one store),
        while a process that wants the directory alone is still refused, and they are refused while it
        holds it."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise DirectoryBusy(f"{self.directory} is in use by {holder}; "
                                f"give each {owner} its own directory") from None
        if shared:  # the first sharer's line stays: it names the kind of holder
            if not os.pread(self._fd, 1, 0):
                os.pwrite(self._fd, f"{owner} (shared)\n".encode(), 0)
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{owner} (pid {os.getpid()})\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
