"""Advisory locks on output folders, so two processes never write one artifact at once.

Two trainings in one run folder, or two encoders on one dataset, would each believe their
output is theirs (checkpoints reported saved that the other wrote; every image encoded twice).
The lock is an `fcntl` lock on a hidden file in the folder: the kernel drops it when the holder
exits, however it exits, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bigasp.errors import BigaspError


class Busy(BigaspError):
    """Another process holds the lock."""


@contextmanager
def folder_lock(path: str | os.PathLike, busy: str, *, slot: int | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on the file `path` (created if missing) for the `with` block.

    `busy` is the error message when another process holds it; the holder's pid and host are
    appended. `slot` locks only byte `slot` of the file instead of the whole file: the ranks of
    one distributed job take distinct slots and coexist, while a second job's rank 0 collides
    with the first's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            if slot is None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
        except (BlockingIOError, PermissionError):
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            raise Busy(f"{busy} ({holder or 'lock ' + str(path)})") from None
        if slot is None or slot == 0:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"held by pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
