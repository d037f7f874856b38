"""Ingest sources at URLs: folders (prefixes) of objects and uncompressed tar shards.

`s3://bucket/photos/` lists the objects under the prefix; `s3://bucket/shards/{00000..01023}.tar`
is expanded the way webdataset writes shard names (brace ranges, via `braceexpand`). Each item's
path is its URL (`URL::member` inside a tar) and its `Ref` the object's byte range there, so the
manifest never records a local temporary path and later stages fetch each image with one
ranged read.

A tar shard is read once, front to back, in large ranged requests (the next one fetched while
the current one is parsed), and each member's bytes travel with its item: headers, images and
sidecars are fetched exactly once, and a rank reads only the shards it owns (`owns`). The
members of one sample must be contiguous (webdataset and img2dataset write them so) for a
sidecar to pair with its image.

Bad input becomes a reject, as on disk: a missing shard of a brace range (`missing`), a shard
that ends early (`truncated`), a member past the end. Credentials, a missing bucket and denied
access stop the run with one line naming the URL (`remote.RemoteAccessError`).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from bigasp.prep.parquet import scan_parquet
from bigasp.prep.sources import PARQUET_EXT, SIDECAR_EXT, Item, Ref, _hidden, _problem, _split
from bigasp.store import remote

READ_BLOCK = 4 << 20  # bytes per ranged request while streaming a shard
PREFETCH = 2  # requests in flight ahead of the parser (0 = fetch on demand)

Owns = Callable[[str], bool]


def expand(src: str) -> list[str]:
    """webdataset's brace ranges (`{00000..00009}`, `{a,b}`) expanded, in order."""
    if "{" not in src:
        return [src]
    from braceexpand import braceexpand

    return list(braceexpand(src))


class RangeReader(io.RawIOBase):
    """The object at `url` read front to back in `block`-byte ranged requests, with `prefetch`
    requests in flight ahead, each retried by `remote.read_range`. Seeks forward only (tarfile
    in stream mode never seeks back)."""

    def __init__(self, url: str, size: int, block: int = READ_BLOCK, prefetch: int = PREFETCH):
        self.url, self.size, self.block = url, size, block
        self._pos = 0  # next byte handed to the reader
        self._next = 0  # next byte to request
        self._buf = b""
        self._buf_at = 0
        self._pool = ThreadPoolExecutor(prefetch, thread_name_prefix="bigasp-shard") if prefetch > 0 else None
        self._ahead: list[Future[bytes]] = []
        self._depth = prefetch

    def readable(self) -> bool:
        return True

    def _fetch(self, start: int) -> bytes:
        return remote.read_range(self.url, start, min(self.block, self.size - start))

    def _fill(self) -> bytes:
        if self._pool is None:
            start = self._next
            self._next += min(self.block, self.size - start)
            return self._fetch(start)
        while len(self._ahead) <= self._depth and self._next < self.size:
            self._ahead.append(self._pool.submit(self._fetch, self._next))
            self._next += min(self.block, self.size - self._next)
        return self._ahead.pop(0).result()

    def readinto(self, b) -> int:
        if self._pos >= self.size:
            return 0
        end = self._buf_at + len(self._buf)
        if self._pos >= end:
            self._buf_at = end
            self._buf = self._fill()
            if not self._buf:
                return 0
        i = self._pos - self._buf_at
        n = min(len(b), len(self._buf) - i)
        memoryview(b)[:n] = self._buf[i : i + n]
        self._pos += n
        return n

    def bytes_at(self, start: int, n: int) -> bytes:
        """Bytes [start, start+n): from the block in hand when it holds them (tarfile has just
        read the end-of-archive block through it), else one more ranged read."""
        i = start - self._buf_at
        if i >= 0 and i + n <= len(self._buf):
            return self._buf[i : i + n]
        return remote.read_range(self.url, start, n)

    def close(self) -> None:
        if self._pool is not None:
            for f in self._ahead:
                f.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
        super().close()


def scan_url(
    src: str, owns: Owns | None = None, prefetch: int = PREFETCH, book=None, image_column: str = ""
) -> Iterator[Item]:
    """Items of one URL source (a prefix, a tar shard, brace-expanded shards, or one object);
    `owns(unit_url)` False = another rank's share: not read at all. `book` (a
    `shardbook.Book`) skips tar shards ingested whole at the same ETag, and hears of those read whole."""
    names = expand(src)
    for url in names:
        if owns is not None and url.endswith(".tar") and not owns(url):
            continue
        try:
            meta = remote.info(url)
        except FileNotFoundError as err:
            if url == src or not _bucket_exists(url):  # as a missing folder on disk, the run stops
                raise remote.bucket_error(url, err) from None
            if owns is None or owns(url):
                yield _problem(
                    url, "missing", f"object not found ({err}); re-upload it or drop it from the source", src
                )
            continue
        if meta.get("type") == "directory":
            yield from scan_prefix(url, src, owns, image_column)
        elif url.lower().endswith(PARQUET_EXT):
            if owns is None or owns(url):
                yield from scan_parquet(url, src, image_column)
        elif url.lower().endswith(".tar"):
            if book is not None and book.unchanged(url, remote.version(meta)) is not None:
                continue  # ingested whole at this ETag: not fetched again
            yield from scan_tar_url(url, meta, src, prefetch, book)
        elif owns is None or owns(url):
            yield _object_item(url, meta, {}, src)


def _bucket_exists(url: str) -> bool:
    """Whether the bucket (first path part) of `url` exists: a missing shard of a brace range is a
    reject, but a missing bucket is one error line, not a reject per shard."""
    proto, rest = url.split("://", 1)
    try:
        remote.info(f"{proto}://{rest.split('/', 1)[0]}")
    except FileNotFoundError:
        return False
    return True


def _object_item(url: str, meta: dict, side: dict[str, dict], origin: str) -> Item:
    def ref(u: str, m: dict) -> Ref:
        return Ref(u, None, int(m.get("size") or 0), 0.0, remote.version(m))

    return Item(
        url,
        ref(url, meta),
        0.0,
        ref(*side[".txt"]) if ".txt" in side else None,
        ref(*side[".json"]) if ".json" in side else None,
        origin=origin,
        caption=ref(*side[".caption"]) if ".caption" in side else None,
    )


def scan_prefix(url: str, origin: str, owns: Owns | None = None, image_column: str = "") -> Iterator[Item]:
    """Objects under a prefix, sorted by key; sidecars pair by name in the same folder."""
    fs, path = remote.filesystem(url)
    try:
        found = remote.call(url, lambda: fs.find(path, detail=True))
    except FileNotFoundError as err:
        raise remote.bucket_error(url, err) from None
    base = path.rstrip("/") + "/"
    proto = url.split("://", 1)[0]
    objs: dict[str, dict] = {}
    for p, m in found.items():
        rel = p[len(base) :] if p.startswith(base) else p
        if m.get("type") == "directory" or any(_hidden(part) for part in rel.split("/")):
            continue
        objs[p] = m
    for p in sorted(objs):
        stem, ext = _split(p)
        if ext in SIDECAR_EXT:
            continue
        u = f"{proto}://{p}"
        if owns is not None and not owns(u):
            continue
        if ext in PARQUET_EXT:  # one image per row, as in a folder on disk
            yield from scan_parquet(u, origin, image_column, in_folder=True)
            continue
        side = {s: (f"{proto}://{stem}{s}", objs[stem + s]) for s in SIDECAR_EXT if stem + s in objs}
        yield _object_item(u, objs[p], side, origin)


def scan_tar_url(url: str, meta: dict, origin: str, prefetch: int = PREFETCH, book=None) -> Iterator[Item]:
    """Members of one uncompressed tar shard at `url`, read once in order (see the module doc)."""
    size = int(meta.get("size") or 0)
    ver = remote.version(meta)
    reader = RangeReader(url, size, prefetch=prefetch)
    group: list[tuple[tarfile.TarInfo, bytes | None]] = []
    count = 0
    items = 0
    stopped = ""
    try:
        try:
            tf = tarfile.open(fileobj=io.BufferedReader(reader, 1 << 16), mode="r|")  # noqa: SIM115
        except (tarfile.TarError, EOFError, ValueError) as err:
            yield _problem(
                url,
                "corrupt",
                f"not an uncompressed tar ({err}); decompress it first (e.g. `gunzip`)",
                origin,
                size,
            )
            return
        while True:
            try:
                m = tf.next()
            except (tarfile.TarError, EOFError, ValueError, UnicodeError) as err:
                stopped = f"{type(err).__name__}: {err}"
                break
            if m is None:
                break
            count += 1
            if group and _split(m.name)[0] != _split(group[0][0].name)[0]:
                for it in _emit(url, group, size, ver, origin):
                    items += 1
                    yield it
                group = []
            data = None
            if m.isfile() and m.offset_data + m.size <= size:
                try:
                    f = tf.extractfile(m)
                    data = f.read() if f is not None else None
                except (tarfile.TarError, EOFError, OSError) as err:
                    stopped = f"{type(err).__name__}: {err}"
                    break
            group.append((m, data))
        end = tf.offset
    finally:
        reader.close()
    for it in _emit(url, group, size, ver, origin):
        items += 1
        yield it
    if not stopped:
        if end + tarfile.BLOCKSIZE > size:
            stopped = f"no end-of-archive marker: the object ends at byte {size}"
        elif reader.bytes_at(end, tarfile.BLOCKSIZE).count(0) != tarfile.BLOCKSIZE:
            stopped = f"no valid member header at byte {end}"
    if not stopped and book is not None:
        book.finished(url, ver, items)
    if stopped:
        yield _problem(
            f"{url}::",
            "truncated",
            f"tar unreadable after {count} members ({stopped}); the members before were kept, "
            "any after are missing: re-create or re-upload the shard",
            origin,
            size,
        )


def _emit(url: str, group: list[tuple[tarfile.TarInfo, bytes | None]], size: int, ver: str, origin: str):
    side: dict[str, Ref] = {}
    for m, data in group:
        _, ext = _split(m.name)
        if ext in SIDECAR_EXT and data is not None:
            side[ext] = Ref(url, m.offset_data, m.size, float(m.mtime), ver, data)
    for m, data in group:
        base = m.name.rsplit("/", 1)[-1]
        if m.isdir() or _hidden(base) or not base:
            continue
        loc = f"{url}::{m.name}"
        _, ext = _split(m.name)
        if not m.isfile():
            yield _problem(
                loc,
                "not_a_file",
                "a link or special member, not file data; put the file itself in the tar",
                origin,
            )
            continue
        if ext in SIDECAR_EXT:
            continue
        if data is None:
            yield _problem(
                loc,
                "truncated",
                f"member needs bytes up to {m.offset_data + m.size} but the object ends at {size} "
                "(truncated tar); re-create or re-upload the shard",
                origin,
                m.size,
                float(m.mtime),
            )
            continue
        yield Item(
            loc,
            Ref(url, m.offset_data, m.size, float(m.mtime), ver, data),
            float(m.mtime),
            side.get(".txt"),
            side.get(".json"),
            origin=origin,
            caption=side.get(".caption"),
        )


def scope_prefixes(src: str) -> list[str]:
    """Path prefixes (and exact paths) a URL source covers, for pruning what is gone from it."""
    out = []
    for url in expand(src):
        out += [f"{url}::", url] if url.lower().endswith(".tar") else [url.rstrip("/") + "/", url]
    return out
