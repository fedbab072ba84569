"""One job per output folder: :class:`FolderLock`, an exclusive lock on ``DIR/.icecache-ray.lock``.

The lock is an ``flock`` on that file, so it goes away with its process however the process ends
(a killed job cannot leave the folder locked for ever). The file also says who holds it: the
owner's pid, host, start time and command line, which is what a second job names when it is
refused. A lock file left by a process that is gone (its flock went with it) is *stale*: the next
job takes it over and logs a warning naming the previous owner. A clean exit removes the file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".icecache-ray.lock"


class FolderLocked(RuntimeError):
    """Another live process holds the folder's lock (the message names it)."""


def owner_info() -> dict:
    """What this process writes into a lock it holds."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)}


def describe(owner: dict) -> str:
    """``pid 123 on host h (since ...: command)`` from a lock file's contents."""
    if not owner:
        return "an unknown process (the lock file is empty or unreadable)"
    text = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}"
    if owner.get("started"):
        text += f", since {owner['started']}"
    return text + (f" ({owner['command']})" if owner.get("command") else "")


class FolderLock:
    """Exclusive lock on a folder (see module docstring). ``with FolderLock(path):`` or
    :meth:`acquire` / :meth:`release`; :meth:`acquire` raises :class:`FolderLocked`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        """Take the lock (the folder must exist). Raises FolderLocked naming the live owner."""
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read(fd)
                os.close(fd)
                raise FolderLocked(f"output folder {str(self.folder)!r} is in use by {describe(owner)}; "
                                   f"wait for that job to end (or stop it), or choose another --output") from None
            if not _same_file(fd, self.path):  # its last owner removed it between our open and flock: again
                os.close(fd)
                continue
            self._take(fd)
        return self

    def _take(self, fd: int) -> None:
        previous = _read(fd)
        if previous and previous.get("pid") != os.getpid():
            log.warning("taking over the stale lock of %s on %s: that process is gone", describe(previous), self.folder)
        data = (json.dumps(owner_info()) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a waiting job re-opens the new file
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict:
    """The owner recorded in an open lock file ({} when empty or not JSON)."""
    try:
        data = os.pread(fd, 4096, 0)
        owner = json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
