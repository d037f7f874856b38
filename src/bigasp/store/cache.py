"""A local disk cache of latent records read from object storage.

Training reads each latent once per epoch, in an order planned ahead, from a dataset that may
sit in a bucket far from the GPUs. Records fetched from the bucket are kept here, one file per
record, so later epochs (and resumed or restarted runs) read them from the local disk; the
cache stays under a size limit by evicting the least recently used records.

Each entry's name holds the shard, offset, length and crc32 of the record, so a re-encoded
shard never serves stale bytes, and the bytes are checksummed again on every read. Several
processes (DataLoader workers, ranks on one node) share one cache directory: entries are
written to a hidden temp name and renamed, and an entry another process evicted is a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from bigasp.fsutil import tmp_sibling

DEFAULT_CACHE_DIR = "~/.cache/bigasp/latents"


def default_cache_dir() -> Path:
    return Path(os.environ.get("BIGASP_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


class RecordCache:
    """Records of one dataset URL under `dir/<hash of the URL>/`, at most `max_bytes` in all."""

    def __init__(self, directory: str | os.PathLike, dataset_url: str, max_bytes: int):
        tag = hashlib.blake2b(dataset_url.encode(), digest_size=8).hexdigest()
        self.dir = Path(directory).expanduser() / tag
        self.max_bytes = int(max_bytes)
        self._bytes: int | None = None  # this process's running estimate; rescanned on eviction
        self.hits = 0
        self.misses = 0

    def __getstate__(self):  # DataLoader workers start with their own estimate and counters
        state = self.__dict__.copy()
        state.update(_bytes=None, hits=0, misses=0)
        return state

    @staticmethod
    def key(shard: str, offset: int, length: int, crc: int) -> str:
        h = hashlib.blake2b(shard.encode(), digest_size=8).hexdigest()
        return f"{h}-{offset}-{length}-{crc:08x}"

    def get(self, key: str) -> bytes | None:
        path = self.dir / key
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            self.misses += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently *used* is evicted first
        self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        if self.max_bytes <= 0 or len(data) > self.max_bytes:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / key
        tmp = tmp_sibling(final)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, final)
        except OSError:  # a full or read-only cache disk only costs speed
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        if self._bytes is None:
            self._bytes = self.size()
        else:
            self._bytes += len(data)
        if self._bytes > self.max_bytes:
            self.evict()

    def drop(self, key: str) -> None:
        with contextlib.suppress(OSError):
            (self.dir / key).unlink()

    def size(self) -> int:
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for e in os.scandir(self.dir):
                with contextlib.suppress(FileNotFoundError):
                    total += e.stat().st_size
        return total

    def evict(self, target: float = 0.9) -> int:
        """Delete least recently used entries until the cache holds <= target * max_bytes; returns
        the bytes freed. (Going below the limit means not rescanning on every insert.)"""
        entries = []
        with contextlib.suppress(FileNotFoundError):
            for e in os.scandir(self.dir):
                with contextlib.suppress(FileNotFoundError):
                    st = e.stat()
                    entries.append((st.st_mtime, st.st_size, e.path))
        total = sum(s for _, s, _ in entries)
        freed = 0
        for _, size, path in sorted(entries):
            if total - freed <= target * self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                freed += size
        self._bytes = total - freed
        return freed
