"""Enumerate ingest inputs: folders (recursive), uncompressed `.tar` shards, and path lists.

Every image becomes an `Item` that says where its bytes are (a file, or an offset inside a
tar) and where its sidecars are, so a worker process can read it without re-opening the tar
index. Sidecars pair with images by name: `photo.jpg` <- `photo.txt`, `photo.json`.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bigasp.errors import DataError

SIDECAR_EXT = (".txt", ".json")
LIST_EXT = (".txt", ".lst", ".list")


@dataclass(frozen=True)
class Ref:
    """Bytes [offset, offset+size) of `file`; offset None = the whole file."""

    file: str
    offset: int | None
    size: int

    def read(self) -> bytes:
        with open(self.file, "rb") as f:
            if self.offset is None:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True)
class Item:
    path: str  # locator recorded in the manifest ("a.tar::member" inside tars)
    data: Ref
    mtime: float
    txt: Ref | None = None
    json: Ref | None = None
    missing: bool = False  # listed but not found, or unreadable while scanning
    error: str = ""  # why, when missing

    @property
    def key(self) -> tuple[str, int, float]:
        return (self.path, self.data.size, self.mtime)


def _split(name: str) -> tuple[str, str]:
    stem, dot, ext = name.rpartition(".")
    return (stem, "." + ext.lower()) if dot and stem else (name, "")


def _hidden(name: str) -> bool:
    return name.startswith(".")


def scan_folder(root: Path) -> Iterator[Item]:
    """Depth-first, names sorted; follows symlinks but never visits a directory twice."""
    stack = [root]
    seen: set[tuple[int, int]] = set()
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue  # symlink cycle or a second link to the same folder
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as err:
            if d == root:
                raise DataError(f"cannot list {d}: {err}") from None
            yield Item(str(d), Ref(str(d), None, 0), 0.0, missing=True, error=f"cannot list folder: {err}")
            continue
        files: dict[str, os.DirEntry] = {}
        subdirs = []
        for e in entries:
            if _hidden(e.name):
                continue
            try:
                if e.is_dir(follow_symlinks=True):
                    subdirs.append(Path(e.path))
                elif e.is_file(follow_symlinks=True):
                    files[e.name] = e
            except OSError:
                continue  # vanished or a dangling symlink: nothing to ingest
        stack.extend(reversed(subdirs))
        for name, e in files.items():
            stem, ext = _split(name)
            if ext in SIDECAR_EXT:
                continue
            try:
                fst = e.stat()
                side = {}
                for sext in SIDECAR_EXT:
                    s = files.get(stem + sext)
                    if s is not None:
                        side[sext] = Ref(s.path, None, s.stat().st_size)
            except OSError as err:
                yield Item(e.path, Ref(e.path, None, 0), 0.0, missing=True, error=str(err))
                continue
            yield Item(
                e.path, Ref(e.path, None, fst.st_size), fst.st_mtime, side.get(".txt"), side.get(".json")
            )


def scan_tar(path: Path) -> Iterator[Item]:
    try:
        tf = tarfile.open(path, "r:")  # noqa: SIM115 - uncompressed only: members are read by offset
    except tarfile.ReadError as err:
        raise DataError(
            f"{path}: not an uncompressed tar ({err}); decompress it first (e.g. `gunzip`), "
            "because images inside are read by byte offset"
        ) from None
    with tf:
        members = [m for m in tf.getmembers() if m.isfile()]
    by_name = {m.name: m for m in members}
    for m in members:
        base = m.name.rsplit("/", 1)[-1]
        if _hidden(base):
            continue
        stem, ext = _split(m.name)
        if ext in SIDECAR_EXT:
            continue
        side = {}
        for sext in SIDECAR_EXT:
            s = by_name.get(stem + sext)
            if s is not None:
                side[sext] = Ref(str(path), s.offset_data, s.size)
        yield Item(
            f"{path}::{m.name}",
            Ref(str(path), m.offset_data, m.size),
            float(m.mtime),
            side.get(".txt"),
            side.get(".json"),
        )


def scan_list(path: Path) -> Iterator[Item]:
    base = path.parent
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        p = (p if p.is_absolute() else base / p).absolute()
        yield _single(p)


def _single(p: Path) -> Item:
    try:
        st = p.stat()
    except OSError:
        return Item(str(p), Ref(str(p), None, 0), 0.0, missing=True)
    stem, _ = _split(p.name)
    side = {}
    for sext in SIDECAR_EXT:
        s = p.with_name(stem + sext)
        if s.is_file():
            side[sext] = Ref(str(s), None, s.stat().st_size)
    return Item(str(p), Ref(str(p), None, st.st_size), st.st_mtime, side.get(".txt"), side.get(".json"))


def scan(sources: list[str | os.PathLike]) -> Iterator[Item]:
    """Items of every source, in a stable order (sources in order, names sorted)."""
    for src in sources:
        p = Path(src).expanduser().absolute()  # the manifest must not depend on the working directory
        if p.is_dir():
            yield from scan_folder(p)
        elif p.is_file() and p.suffix.lower() == ".tar":
            yield from scan_tar(p)
        elif p.is_file() and p.suffix.lower() in LIST_EXT:
            yield from scan_list(p)
        elif p.is_file():
            yield _single(p)
        else:
            raise DataError(
                f"ingest source {src} does not exist (expected a folder, a .tar or a list of paths)"
            )
