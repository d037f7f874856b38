"""Crash-safe file writes, shared by every stage that writes artifacts.

Principle 5 of the design: a crash at any point leaves the previous state usable. Every
writer therefore writes a hidden sibling (readers ignore names starting with "."), fsyncs
it, renames it over the final name and fsyncs the directory, so the final name holds either
the old content or the whole new one. Published files get the usual permissions
(0666 minus the umask), whatever mode the library that wrote them chose.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def tmp_sibling(final: str | os.PathLike) -> Path:
    """A unique hidden temp path next to `final` (same filesystem, so rename is atomic)."""
    final = Path(final)
    return final.with_name(f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # platforms without directory fds (Windows): rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where the kernel allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (a brief window; fine for a CLI)
    os.umask(mask)
    return mask


def usual_mode(path: str | os.PathLike) -> None:
    """Give a written file the mode `open()` would have: 0666 (dirs 0777) minus the umask.

    Some writers create private 0600 files (safetensors writes through a temp file); an
    export or checkpoint meant to be shared or served must not stay readable only by its
    owner. Applied to every file before it is published under its final name.
    """
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory below `root` (before renaming a whole directory), and give
    each file the usual mode (see `usual_mode`)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            usual_mode(Path(dirpath, name))
            fsync_file(Path(dirpath, name))
        fsync_dir(dirpath)


@contextmanager
def atomic_path(final: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `final`, on error it is removed.

    `durable=False` skips the fsyncs for cheap, re-creatable outputs (HTML pages, previews).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(final)
    try:
        yield tmp
        if tmp.is_file():
            usual_mode(tmp)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, final)
    except OSError as err:
        # The temp file is gone once we leave: name the file the user asked for instead.
        if tmp.name in str(err.filename) or tmp.name in str(err.filename2):
            raise type(err)(err.errno, f"{err.strerror} (writing {final})", str(final)) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    if durable:
        fsync_dir(final.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
