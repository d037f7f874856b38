"""Enumerate ingest inputs: folders (recursive), uncompressed `.tar` shards, Parquet files
(one image per row, see `bigasp.prep.parquet`), path lists and glob patterns.

Every image becomes an `Item` that says where its bytes are (a file, or an offset inside a
tar) and where its sidecars are, so a worker process can read it without re-opening the tar
index. Sidecars pair with images by name: `photo.jpg` <- `photo.txt`, `photo.json`.

Nothing found while scanning stops the scan: a name that is not UTF-8, a special file, a tar
link member or a truncated tar becomes an `Item` with `problem` set, which ingest records as
a reject with that reason, and the scan goes on.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bigasp.errors import DataError
from bigasp.store import remote

SIDECAR_EXT = (".txt", ".json", ".caption")  # .caption: kohya's caption files
LIST_EXT = (".txt", ".lst", ".list")
PARQUET_EXT = (".parquet",)  # one image per row: see bigasp.prep.parquet
CHUNK = 1 << 20


@dataclass(frozen=True)
class Ref:
    """Bytes [offset, offset+size) of `file`; offset None = the whole file.

    `file` is a local path or a URL (s3://, gs://, http(s)://): a URL is read with one ranged
    request of exactly these bytes (see `bigasp.store.remote`). `version` is the object's ETag
    (or a tar shard's) where it has one, so a rewritten object is seen as changed. `data` holds
    the bytes when the scan already fetched them (a tar shard at a URL is read once, in order),
    so they are not fetched a second time.

    A Parquet row (`row` set): the image bytes in `column` of row `row` (0-based, over the whole
    file) of the Parquet file `file`. `size` is then not used to read: a scanned row carries the
    Parquet file's size (with `mtime`, whether the file changed), a row rebuilt from the manifest
    the image's byte count. `read()` and `open()` are the only ways stages get the bytes.
    """

    file: str
    offset: int | None
    size: int
    mtime: float = 0.0
    version: str = ""
    data: bytes | None = field(default=None, compare=False, repr=False)
    row: int | None = None
    column: str | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.row is not None:
            from bigasp.prep.parquet import read_cell

            return read_cell(self.file, self.row, self.column or "")
        if remote.is_url(self.file):
            return remote.read_range(self.file, self.offset, self.size)
        with open(self.file, "rb") as f:
            if self.offset is None:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)

    def open(self) -> io.BufferedReader:
        """A seekable binary stream of exactly these bytes (a window into the tar for members)."""
        if self.data is not None or self.row is not None or remote.is_url(self.file):
            return io.BufferedReader(io.BytesIO(self.read()), CHUNK)  # type: ignore[arg-type]
        raw = open(self.file, "rb", buffering=0)  # noqa: SIM115 - returned to the caller
        if self.offset is None:
            return io.BufferedReader(raw, CHUNK)
        return io.BufferedReader(_Window(raw, self.offset, self.size), CHUNK)


class _Window(io.RawIOBase):
    """Read-only view of `size` bytes at `offset` of an open file: Pillow sees a whole file."""

    def __init__(self, raw, offset: int, size: int):
        self._raw, self._off, self._size, self._pos = raw, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b) -> int:
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        self._raw.seek(self._off + self._pos)
        got = self._raw.readinto(memoryview(b)[:n])
        self._pos += got or 0
        return got or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


@dataclass(frozen=True)
class Item:
    path: str  # locator recorded in the manifest ("a.tar::member" inside tars)
    data: Ref
    mtime: float
    txt: Ref | None = None
    json: Ref | None = None
    missing: bool = False  # listed but not found, or unreadable while scanning
    error: str = ""  # why, when missing or problem
    origin: str = ""  # the ingest source (folder, tar or list) this item was found through
    problem: str = ""  # a reject reason found while scanning (not_a_file, bad_filename, truncated ...)
    caption: Ref | None = None  # kohya's `name.caption` sidecar, read like `name.txt`

    @functools.cached_property
    def change_key(self) -> str:
        """What must stay equal for an earlier result to be reused: the image's and sidecars' size and
        mtime (and a tar member's offset, which a rewritten tar may move)."""
        parts = [self.data.size, self.mtime, self.data.offset, self.missing, self.problem]
        for s in (self.txt, self.json):
            parts += [None, None] if s is None else [s.size, s.mtime]
        if self.caption is not None:  # only then: keys of datasets without .caption files stay as they were
            parts += [self.caption.size, self.caption.mtime]
        if self.data.row is not None:  # a Parquet row: which row and column of the (unchanged) file
            parts += [self.data.row, self.data.column]
        versions = [r.version for r in (self.data, self.txt, self.json, self.caption) if r is not None]
        if any(versions):  # objects at URLs: their ETags (local files have none: keys stay as they were)
            parts.append(versions)
        return hashlib.blake2b(repr(parts).encode(), digest_size=12).hexdigest()


def manifest_ref(path: str, tar_offset: int | None, file_size: int, row: int | None = None) -> Ref:
    """Where an image's bytes are, from its manifest row: a file; a tar member (`a.tar::member`,
    `tar_offset` set); or a Parquet row (`a.parquet::column[R]`, `row` = R set)."""
    if row is not None:
        file, _, rest = path.partition("::")
        column = rest[: rest.rindex("[")] if "[" in rest else rest
        return Ref(file, None, int(file_size), row=int(row), column=column)
    file = path.split("::", 1)[0] if tar_offset is not None else path
    return Ref(file, tar_offset, int(file_size))


def printable(path: str) -> str:
    """`path` as valid UTF-8 text: undecodable bytes of a file name become \\xNN escapes."""
    try:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file-name byte produces (e.g. from JSON)
        return path.encode("utf-8", "backslashreplace").decode("utf-8")


def utf8_ok(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


BAD_NAME = (
    "file name is not valid UTF-8, so the dataset cannot record it; rename it to UTF-8 "
    "(e.g. `convmv -f latin1 -t utf-8 --notest -r FOLDER`) and re-run ingest"
)


def _split(name: str) -> tuple[str, str]:
    stem, dot, ext = name.rpartition(".")
    return (stem, "." + ext.lower()) if dot and stem else (name, "")


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _problem(path: str, reason: str, detail: str, origin: str, size: int = 0, mtime: float = 0.0) -> Item:
    return Item(printable(path), Ref(path, None, size), mtime, origin=origin, problem=reason, error=detail)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def scan_folder(root: Path, origin: str = "", image_column: str = "") -> Iterator[Item]:
    """Depth-first, names sorted; follows symlinks but never visits a directory twice. Parquet
    files in it are read as Parquet sources (`image_column`: see `scan_parquet`)."""
    origin = origin or str(root)
    stack = [root]
    seen: set[tuple[int, int]] = set()
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue  # symlink cycle or a second link to the same folder
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(d), key=lambda e: os.fsencode(e.name))
        except OSError as err:
            if d == root:
                raise DataError(f"cannot list {printable(str(d))}: {err}") from None
            yield _problem(str(d), "unreadable", f"cannot list folder: {err}", origin)
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
                else:
                    mode = e.stat(follow_symlinks=True).st_mode
                    _, ext = _split(e.name)
                    if ext not in SIDECAR_EXT:
                        yield _problem(
                            e.path, "not_a_file", f"{_kind(mode)}, not an image file; ingest skips it", origin
                        )
            except OSError:
                continue  # vanished or a dangling symlink: nothing to ingest
        stack.extend(reversed(subdirs))
        for name, e in files.items():
            stem, ext = _split(name)
            if ext in SIDECAR_EXT:
                continue
            if not utf8_ok(e.path):
                yield _problem(e.path, "bad_filename", BAD_NAME, origin)
                continue
            if ext in PARQUET_EXT:
                yield from _parquet(e.path, origin, image_column, in_folder=True)
                continue
            try:
                fst = e.stat()
                side = {}
                for sext in SIDECAR_EXT:
                    s = files.get(stem + sext)
                    if s is not None:
                        sst = s.stat()
                        side[sext] = Ref(s.path, None, sst.st_size, sst.st_mtime)
            except OSError as err:
                yield Item(e.path, Ref(e.path, None, 0), 0.0, missing=True, error=str(err), origin=origin)
                continue
            yield Item(
                e.path,
                Ref(e.path, None, fst.st_size),
                fst.st_mtime,
                side.get(".txt"),
                side.get(".json"),
                origin=origin,
                caption=side.get(".caption"),
            )


def _tar_members(tf: tarfile.TarFile, size: int) -> tuple[list[tarfile.TarInfo], str]:
    """Members readable from the headers, and why the listing stopped early ('' if it did not).

    tarfile ends a listing silently at a short or invalid header, so a truncated or damaged
    tar is recognised by what follows the last member: a whole end-of-archive (zero) block.
    """
    members = []
    while True:
        try:
            m = tf.next()
        except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeError) as err:
            return members, f"{type(err).__name__}: {err}"
        if m is None:
            break
        members.append(m)
    end = tf.offset
    tf.fileobj.seek(end)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        return members, f"no end-of-archive marker: the file ends at byte {size}"
    if block.count(0) != tarfile.BLOCKSIZE:
        return members, f"no valid member header at byte {end}"
    return members, ""


def scan_tar(path: Path, origin: str = "") -> Iterator[Item]:
    origin = origin or str(path)
    mtime = path.stat().st_mtime
    size = path.stat().st_size
    try:
        tf = tarfile.open(path, "r:")  # noqa: SIM115 - uncompressed only: members are read by offset
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        yield _problem(
            str(path),
            "corrupt",
            f"not an uncompressed tar ({err}); decompress it first (e.g. `gunzip`), "
            "because images inside are read by byte offset",
            origin,
            size,
            mtime,
        )
        return
    with tf:
        members, stopped = _tar_members(tf, size)
    by_name = {m.name: m for m in members if m.isfile()}
    for m in members:
        base = m.name.rsplit("/", 1)[-1]
        if m.isdir() or _hidden(base) or not base:
            continue
        loc = f"{path}::{m.name}"
        stem, ext = _split(m.name)
        if not m.isfile():
            if m.issym() or m.islnk():
                kind = "symbolic" if m.issym() else "hard"
                why = f"a {kind} link to {printable(m.linkname)!r}, not file data; put the file itself in the tar"
            else:
                why = "a device, FIFO or other special member, not file data"
            yield _problem(loc, "not_a_file", why, origin, 0, float(m.mtime))
            continue
        if ext in SIDECAR_EXT:
            continue
        if not utf8_ok(loc):
            yield _problem(loc, "bad_filename", BAD_NAME, origin, m.size, float(m.mtime))
            continue
        if m.offset_data + m.size > size:
            yield _problem(
                loc,
                "truncated",
                f"member needs bytes up to {m.offset_data + m.size} but the tar ends at {size} "
                "(truncated tar); re-create or re-download the shard",
                origin,
                m.size,
                float(m.mtime),
            )
            continue
        side = {}
        for sext in SIDECAR_EXT:
            s = by_name.get(stem + sext)
            if s is not None and s.offset_data + s.size <= size:
                side[sext] = Ref(str(path), s.offset_data, s.size, float(s.mtime))
        yield Item(
            loc,
            Ref(str(path), m.offset_data, m.size),
            float(m.mtime),
            side.get(".txt"),
            side.get(".json"),
            origin=origin,
            caption=side.get(".caption"),
        )
    if stopped:
        yield _problem(
            f"{path}::",
            "truncated",
            f"tar unreadable after {len(members)} members ({stopped}); the members before were kept, "
            "any after are missing: re-create or re-download the shard",
            origin,
            size,
            mtime,
        )


def scan_list(path: Path) -> Iterator[Item]:
    base = path.parent
    origin = str(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read path list {path}: {err}") from None
    for line in raw.decode("utf-8", "surrogateescape").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line).expanduser()
        p = (p if p.is_absolute() else base / p).absolute()
        yield _single(p, origin)


def _single(p: Path, origin: str) -> Item:
    if not utf8_ok(str(p)):
        return _problem(str(p), "bad_filename", BAD_NAME, origin)
    try:
        st = p.stat()
    except OSError:
        return Item(str(p), Ref(str(p), None, 0), 0.0, missing=True, origin=origin)
    if not stat.S_ISREG(st.st_mode):
        return _problem(str(p), "not_a_file", f"{_kind(st.st_mode)}, not an image file", origin)
    stem, _ = _split(p.name)
    side = {}
    for sext in SIDECAR_EXT:
        s = p.with_name(stem + sext)
        try:
            if s.is_file():
                sst = s.stat()
                side[sext] = Ref(str(s), None, sst.st_size, sst.st_mtime)
        except OSError:
            continue
    return Item(
        str(p),
        Ref(str(p), None, st.st_size),
        st.st_mtime,
        side.get(".txt"),
        side.get(".json"),
        origin=origin,
        caption=side.get(".caption"),
    )


def is_pattern(src: str | os.PathLike) -> bool:
    """A source with glob characters that names no existing path: `data/*.parquet`, quoted so that
    bigasp (not the shell, which may hit its argument limit) expands it."""
    s = os.fspath(src)
    if remote.is_url(s):  # URLs take webdataset's brace ranges instead (bigasp.prep.urlsources)
        return False
    return any(c in s for c in "*?[") and not Path(s).expanduser().exists()


def expand_patterns(sources: list[str | os.PathLike]) -> list[str | os.PathLike]:
    """`sources` with each glob pattern replaced by its matches, sorted (`**` spans folders)."""
    import glob

    out: list[str | os.PathLike] = []
    for src in sources:
        if not is_pattern(src):
            out.append(src)
            continue
        pattern = str(resolve_source(src))
        found = sorted(glob.glob(pattern, recursive=True))
        if not found:
            raise DataError(
                f"ingest source {printable(os.fspath(src))} matches no file; check the pattern (it is "
                "expanded by bigasp: `*` within a folder, `**` across folders)"
            )
        out.extend(found)
    return out


def unit_of(path: str) -> str:
    """The unit a rank owns that holds `path`: the tar for a member (`a.tar::m`), else the path."""
    return path.split("::", 1)[0]


def resolve_source(src: str | os.PathLike) -> Path:
    return Path(src).expanduser().absolute()  # the manifest must not depend on the working directory


def _parquet(path: str, origin: str, image_column: str, *, in_folder: bool = False) -> Iterator[Item]:
    from bigasp.prep.parquet import scan_parquet

    return scan_parquet(path, origin, image_column, in_folder=in_folder)


def scan(
    sources: list[str | os.PathLike],
    owns: Callable[[str], bool] | None = None,
    prefetch: int = 2,
    book=None,
    image_column: str = "",
) -> Iterator[Item]:
    """Items of every source, in a stable order (sources in order, names sorted).

    `owns(unit)` False = the unit (a file, a tar or object, by path or URL) is another rank's
    share: it is skipped, and at a URL not even fetched. `book`: see `bigasp.prep.shardbook`.
    `image_column`: the image column of Parquet sources ("" = auto-detect).
    """
    for src in sources:
        if remote.is_url(str(src)):
            from bigasp.prep.urlsources import scan_url

            yield from scan_url(str(src), owns, prefetch, book, image_column)
            continue
        if owns is not None:
            yield from (it for it in scan([src], image_column=image_column) if owns(unit_of(it.path)))
            continue
        p = resolve_source(src)
        if p.is_dir():
            yield from scan_folder(p, image_column=image_column)
        elif p.is_file() and p.suffix.lower() in PARQUET_EXT:
            yield from _parquet(str(p), str(p), image_column)
        elif p.is_file() and p.suffix.lower() == ".tar":
            yield from scan_tar(p)
        elif p.is_file() and p.suffix.lower() in LIST_EXT:
            yield from scan_list(p)
        elif p.is_file():
            yield _single(p, str(p))
        else:
            raise DataError(
                f"ingest source {printable(str(src))} does not exist (expected a folder, a .tar, a .parquet "
                "or a list of paths)"
            )
