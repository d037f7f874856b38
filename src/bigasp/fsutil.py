"""Crash-safe file writes, shared by every stage that writes artifacts.

Principle 5 of the design: a crash at any point leaves the previous state usable. Every
writer therefore writes a hidden sibling (readers ignore names starting with "."), fsyncs
it, renames it over the final name and fsyncs the directory, so the final name holds either
the old content or the whole new one.
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


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory below `root` (before renaming a whole directory)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
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
        if durable:
            fsync_file(tmp)
        os.replace(tmp, final)
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
