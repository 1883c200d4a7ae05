"""One process per run folder: an exclusive OS lock (``flock``) on a lock file inside it, held for the run's life.

The OS drops the lock when its holder exits or is killed, so a lock left by a dead process never blocks; the file
itself stays (deleting it would let two processes lock two different files of the same name)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_NAME = ".lock"
"""The lock file's name in the run folder; not part of the run (an emptiness check ignores it)."""


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """The exclusive lock on ``folder`` (created if missing): taken by :meth:`acquire`, freed by :meth:`release`
    or when the process ends. The holder's pid is written into the file so a refused process can name it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        """Take the lock without waiting; raise RunFolderBusy naming the folder and the holder's pid."""
        if self._file is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        file = self.path.open("a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise RunFolderBusy(
                f"{self.folder} is in use by another run (pid {holder}); wait for it to end or stop it, "
                "or choose another --run-dir"
            ) from None
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        """Free the lock (idempotent); the file stays, see the module docstring."""
        if self._file is not None:
            file, self._file = self._file, None
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
            file.close()
