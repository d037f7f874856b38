"""`LatentDataset`: the training-time view of a dataset directory.

Opening reads only Parquet (manifest + latent index); `read_latent(i)` reads exactly one
record's bytes at its recorded offset, verifies its checksum and decompresses it. File
handles are opened lazily per process and dropped on pickling, so the object can be handed
to DataLoader workers (fork or spawn) and to object-storage filesystems alike.

On object storage (s3://, gs://, ...) records go through a local disk cache (`RecordCache`),
`prefetch(rows)` fetches the records a plan needs next with concurrent ranged reads, and a
record that is missing or fails its checksum is fetched again (`retries` times) before the
error names the shard and record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bigasp.errors import DataError
from bigasp.store import layout
from bigasp.store.manifest import read_dataset_json, read_index, read_manifest
from bigasp.store.shard import check_crc, decode_record

log = logging.getLogger(__name__)

MAX_OPEN_SHARDS = 128  # per process; oldest-opened handle is closed first

INDEX_COLUMNS = (
    "shard",
    "record",
    "offset",
    "length",
    "crc32",
    "compression",
    "bucket_height",
    "bucket_width",
    "original_height",
    "original_width",
    "crop_top",
    "crop_left",
)


def join_latents(manifest: pa.Table, index: pa.Table) -> pa.Table:
    """Manifest rows that have a latent, with the index columns appended, sorted by id.

    (Arrow's hash join cannot carry list columns such as captions, so we join by position.)
    """
    index = index.sort_by("id")
    pos = pc.index_in(index.column("id"), value_set=manifest.column("id"))
    keep = pc.is_valid(pos)
    index = index.filter(keep)
    rows = manifest.take(pc.drop_null(pos))
    for name in INDEX_COLUMNS:
        rows = rows.append_column(index.schema.field(name), index.column(name))
    return rows.combine_chunks()


def read_index_ids(index: pa.Table) -> pa.Array:
    return pc.unique(index.column("id")) if len(index) else pa.array([], pa.string())


class LatentDataset:
    """Images that have a latent, sorted by id, with O(1) checksummed access to each latent.

    `StreamingLatentDataset` (store/streaming.py) is the one that grows while an encoder writes."""

    streaming = False

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        storage_options: dict | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_bytes: int = 50 * 2**30,
        retries: int = 3,
        retry_wait: float = 0.5,
    ):
        fs = self._open(root, storage_options)
        manifest = read_manifest(fs, self.root)
        self.n_images = len(manifest)  # ingested, with or without a latent
        index = read_index(fs, self.root).select(["id", *INDEX_COLUMNS, "variant"])
        recs = index.filter(pc.is_in(index.column("id"), value_set=manifest.column("id")))
        self._set_records(recs)
        self.table: pa.Table = join_latents(manifest, recs.take(pa.array(self._first)))
        self.n_orphan_latents = len(read_index_ids(index)) - len(self.table)  # not in the manifest
        self._setup_reads(cache_dir, cache_bytes, retries, retry_wait)

    def _open(self, root, storage_options) -> Any:
        """Filesystem, root and dataset.json; returns the filesystem."""
        self.root_url = str(root)
        self.storage_options = dict(storage_options or {})
        fs, self.root = layout.url_to_fs(self.root_url, self.storage_options)
        self._fs_obj, self._fs_pid = fs, os.getpid()
        self.meta = read_dataset_json(fs, self.root)
        return fs

    def _setup_reads(self, cache_dir, cache_bytes: int, retries: int, retry_wait: float) -> None:
        """Retries, the local cache for object storage, lazily opened shard handles."""
        fs = self._fs_obj
        self._local = layout.is_local(fs)
        self.retries, self.retry_wait = int(retries), float(retry_wait)
        self.cache = None
        if not self._local:
            from bigasp.store.cache import RecordCache, default_cache_dir

            self.cache = RecordCache(cache_dir or default_cache_dir(), self.root_url, cache_bytes)
        self._fds: dict[int, int] = {}
        self._dctx = None

    @property
    def fs(self):
        """The dataset's filesystem, made again in a forked or spawned process: object-storage
        clients (s3fs, gcsfs) hold an event loop and connections that must not cross a fork."""
        if self._fs_obj is None or self._fs_pid != os.getpid():
            self._fs_obj, _ = layout.url_to_fs(self.root_url, self.storage_options)
            self._fs_pid = os.getpid()
        return self._fs_obj

    def complete_generations(self) -> int:
        """Variants every row has (0 .. n-1): the generations a finished `encode --variants n` made."""
        return int(self.n_variants.min()) if len(self) else 0

    def refresh_variants(self) -> int:
        """Re-read the latent index and take in variants published since (by an encoder still running)
        for the images this dataset already holds; the rows and their order do not change, images
        encoded since are left for the next open. Returns `complete_generations()`."""
        with contextlib.suppress(Exception):  # object stores cache listings: see new index files
            self.fs.invalidate_cache(f"{self.root}/{layout.INDEX_DIR}")
        index = read_index(self.fs, self.root).select(["id", *INDEX_COLUMNS, "variant"])
        recs = index.filter(pc.is_in(index.column("id"), value_set=self.table.column("id")))
        if len(read_index_ids(recs)) != len(self.table):
            raise DataError(
                f"{self.root}: latents listed when the dataset was opened are gone from the index"
            )
        self._set_records(recs)
        return self.complete_generations()

    def _set_records(self, recs: pa.Table) -> None:
        # Every stored latent of a row's image (all variants), sorted by (id, variant):
        # the records of row i are first[i] .. first[i] + n_variants[i] - 1.
        ids = recs.column("id")
        new_id = np.ones(len(recs), dtype=bool)
        if len(recs) > 1:
            new_id[1:] = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
        self._first = np.flatnonzero(new_id).astype(np.int64)
        self.n_variants = np.diff(np.append(self._first, len(recs))).astype(np.int32)
        self.records = recs
        shards = recs.column("shard")
        self.shards: list[str] = pc.unique(shards).to_pylist() if len(recs) else []
        self._shard_idx = (
            pc.index_in(shards, value_set=pa.array(self.shards, pa.string())).to_numpy(zero_copy_only=False)
            if len(recs)
            else np.zeros(0, np.int32)
        ).astype(np.int32)
        col = lambda name: recs.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
        self._offset, self._length, self._crc = col("offset"), col("length"), col("crc32")
        self._zstd = pc.equal(recs.column("compression"), "zstd").to_numpy(zero_copy_only=False).astype(bool)
        self._bh, self._bw = col("bucket_height"), col("bucket_width")
        self._record = col("record")
        self._crop_top, self._crop_left = col("crop_top"), col("crop_left")
        self._variant = col("variant")
        for fd in getattr(self, "_fds", {}).values():  # shard numbering changed: reopen lazily
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}

    def __len__(self) -> int:
        return len(self.table)

    def unencoded_images(self) -> int:
        """Ingested images with no latent that encode did not reject: an encode not yet finished
        (or a shard whose index file is lost). Re-reads the manifest's id column and the rejects."""
        from bigasp.store.manifest import read_rejects

        if self.n_images == len(self.table):
            return 0
        import pyarrow.parquet as pq

        rej = read_rejects(self.fs, self.root)
        rejected = rej.filter(pc.equal(rej.column("stage"), "encode")).column("id")
        done = pa.concat_arrays(
            [
                self.table.column("id").combine_chunks().cast(pa.string()),
                rejected.combine_chunks().cast(pa.string()),
            ]
        )
        path = f"{self.root}/{layout.MANIFEST}"
        missing = 0
        with layout.parquet_reading(path), self.fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["id"], batch_size=1 << 20):  # flat memory
                ids = batch.column(0).cast(pa.string())
                missing += int(pc.sum(pc.invert(pc.is_in(ids, value_set=done))).as_py() or 0)
        return missing

    def unindexed_shards(self) -> list[str]:
        """Shards on disk (relative paths) that have no index file: their latents are invisible
        to training until `bigasp encode` rebuilds the index from the shard's footer."""
        from bigasp.store.manifest import index_files
        from bigasp.store.shard import index_rel, list_shards

        indexed = set(index_files(self.fs, self.root))
        return [
            rel for rel in list_shards(self.fs, self.root) if index_rel(rel).rsplit("/", 1)[-1] not in indexed
        ]

    def __repr__(self) -> str:
        return f"LatentDataset({self.root_url!r}, {len(self)} latents in {len(self.shards)} shards)"

    # Pickling: ship the arrays, not open files or decompressors.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"] = {}
        state["_dctx"] = None
        state["_fs_obj"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def latent_shape(self, i: int) -> tuple[int, int, int]:
        r = self._first[i]
        return (4, int(self._bh[r]) // 8, int(self._bw[r]) // 8)

    def rec(self, i: int, variant: int = 0) -> int:
        """Record index of row `i`'s `variant`-th stored latent (0 = the first; see `n_variants`)."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for a dataset of {len(self)} latents")
        if not 0 <= variant < self.n_variants[i]:
            raise IndexError(f"row {i} has {int(self.n_variants[i])} latent variant(s), not {variant + 1}")
        return int(self._first[i]) + variant

    def crop_of(self, i: int, variant: int = 0) -> tuple[int, int]:
        """(top, left) crop of that variant: its SDXL crop conditioning."""
        r = self.rec(i, variant)
        return int(self._crop_top[r]), int(self._crop_left[r])

    def _where(self, r: int) -> str:
        return f"shard {self.root}/{self.shards[self._shard_idx[r]]} record {int(self._record[r])}"

    def read_bytes(self, i: int, variant: int = 0) -> bytes:
        """The stored bytes of row `i` (compressed if the shard is), not yet verified."""
        return self._read_rec(self.rec(i, variant))

    def _read_rec(self, i: int) -> bytes:
        s = int(self._shard_idx[i])
        offset, length = int(self._offset[i]), int(self._length[i])
        path = f"{self.root}/{self.shards[s]}"
        if self._local:
            fd = self._fds.get(s)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    raise DataError(f"{path} is listed in the latent index but missing") from None
                if len(self._fds) >= MAX_OPEN_SHARDS:  # thousands of shards must not exhaust ulimit -n
                    os.close(self._fds.pop(next(iter(self._fds))))
                self._fds[s] = fd
            try:
                data = os.pread(fd, length, offset)
            except OSError as err:
                raise DataError(f"{self._where(i)}: read failed ({err})") from None
        else:
            try:
                data = self.fs.cat_file(path, start=offset, end=offset + length)
            except FileNotFoundError:
                raise DataError(
                    f"{self._where(i)}: the shard is listed in the latent index but missing"
                ) from None
            except OSError as err:
                raise DataError(f"{self._where(i)}: read failed ({err})") from None
        if len(data) != length:
            raise DataError(f"{self._where(i)}: short read ({len(data)} of {length} bytes); file truncated")
        return data

    def read_latent(self, i: int, variant: int = 0):
        """float16 tensor [4, bucket_height//8, bucket_width//8] of row `i`'s `variant`, checksum-verified."""
        import torch

        return torch.from_numpy(self.read_latent_numpy(i, variant))

    def _cache_key(self, r: int) -> str:
        return self.cache.key(
            self.shards[self._shard_idx[r]], int(self._offset[r]), int(self._length[r]), int(self._crc[r])
        )

    def _crc_ok(self, i: int, data: bytes) -> bool:
        import zlib

        return len(data) == int(self._length[i]) and (zlib.crc32(data) & 0xFFFFFFFF) == int(self._crc[i])

    def verified_bytes(self, i: int) -> bytes:
        """Record `i`'s stored bytes with the checksum verified. From object storage: through the
        cache, and a missing object or a bad checksum is fetched again `retries` times before the
        `DataError` naming the shard and record."""
        if self.cache is None:
            data = self._read_rec(i)
            check_crc(data, int(self._crc[i]), self._where(i))
            return data
        key = self._cache_key(i)
        data = self.cache.get(key)
        if data is not None:
            if self._crc_ok(i, data):
                return data
            self.cache.drop(key)  # a damaged cache entry: fetch it again
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_wait * 2 ** (attempt - 1))
            try:
                data = self._read_rec(i)
            except DataError as err:
                problem = str(err)
                continue
            if self._crc_ok(i, data):
                self.cache.put(key, data)
                return data
            problem = f"{self._where(i)}: checksum mismatch (stored crc32 {int(self._crc[i]):08x})"
        raise DataError(
            f"{problem} (after {self.retries + 1} attempts); the object is missing or corrupt in the bucket: "
            "re-upload it, or delete this shard and its index file and re-run `bigasp encode`"
        )

    def prefetch(self, recs, *, concurrency: int = 32) -> int:
        """Bring records `recs` (see `rec`) into the local cache with concurrent ranged reads (one
        `cat_ranges` call); returns how many were fetched. Problems are left for `verified_bytes`
        to retry and report."""
        if self.cache is None:
            return 0
        want = []
        for i in dict.fromkeys(int(r) for r in recs):
            key = self._cache_key(i)
            if not (self.cache.dir / key).exists():
                want.append((i, key))
        if not want:
            return 0
        paths = [f"{self.root}/{self.shards[self._shard_idx[i]]}" for i, _ in want]
        starts = [int(self._offset[i]) for i, _ in want]
        ends = [int(self._offset[i] + self._length[i]) for i, _ in want]
        try:
            got = self.fs.cat_ranges(paths, starts, ends, on_error="return", batch_size=concurrency)
        except Exception as err:  # whole call failed (network): the reads will retry one by one
            log.debug("prefetch of %d records failed: %s", len(want), err)
            return 0
        fetched = 0
        for (i, key), data in zip(want, got, strict=True):
            if isinstance(data, bytes) and self._crc_ok(i, data):
                self.cache.put(key, data)
                fetched += 1
        return fetched

    def read_latent_numpy(self, i: int, variant: int = 0) -> np.ndarray:
        return self._decode_rec(self.rec(i, variant))

    def _decode_rec(self, i: int) -> np.ndarray:
        data = self.verified_bytes(i)
        where = self._where(i)
        dctx = None
        if self._zstd[i]:
            if self._dctx is None:
                import zstandard

                self._dctx = zstandard.ZstdDecompressor()
            dctx = self._dctx
        shape = (4, int(self._bh[i]) // 8, int(self._bw[i]) // 8)
        arr = decode_record(data, "zstd" if self._zstd[i] else "none", shape, dctx=dctx, where=where)
        return arr if arr.flags.writeable else arr.copy()  # writable, detached from the read buffer

    def shard_headers(
        self, limit: int | None = None, names: list[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Header of each shard, or of the shards `names` (or of `limit` of them spread over the
        list: on object storage every header is a request). A damaged header raises `DataError`
        naming the file."""
        from bigasp.store.shard import read_shard_header

        names = self.shards if names is None else names
        if limit is not None and len(names) > limit:
            step = len(names) / limit
            names = [names[int(k * step)] for k in range(limit)]
        return {n: read_shard_header(f"{self.root}/{n}", None if self._local else self.fs) for n in names}

    def verify(self) -> list[str]:
        """Check every shard's header and footer against the index, that all shards hold latents
        of one encoding (VAE, scaling, seed), and every record's checksum; one message per problem."""
        from bigasp.store.shard import (
            ENCODING_KEYS,
            describe_encoding,
            index_rel,
            read_shard_layout,
            verify_shard_layout,
        )

        errors: list[str] = []
        keep = [
            "id",
            "shard",
            "record",
            "offset",
            "length",
            "crc32",
            "compression",
            "bucket_height",
            "bucket_width",
        ]
        rows_of: dict[str, list[dict]] = {}
        for r in self.records.select(keep).to_pylist():
            rows_of.setdefault(r["shard"], []).append(r)
        encodings: dict[tuple, list[str]] = {}
        for name in self.shards:
            path = f"{self.root}/{name}"
            try:
                header, records = read_shard_layout(path, None if self._local else self.fs)
            except DataError as err:
                errors.append(str(err))
                continue
            errors.extend(verify_shard_layout(path, header, records, rows_of.get(name, [])))
            encodings.setdefault(tuple(header.get(k) for k in ENCODING_KEYS), []).append(name)
        if len(encodings) > 1:
            kinds = "; ".join(
                f"{describe_encoding(dict(zip(ENCODING_KEYS, enc, strict=True)))}: {len(names)} shard(s), "
                f"e.g. {names[0]}"
                for enc, names in encodings.items()
            )
            errors.append(
                f"{self.root}: shards hold latents of different encodings ({kinds}); a model trains on one. "
                "Delete the unwanted encoding's shards and their latents/index files, then re-run `bigasp encode`"
            )
        for rel in self.unindexed_shards():
            errors.append(
                f"{self.root}/{rel} has no index file ({index_rel(rel)}): its latents are not used for training; "
                f"run `bigasp encode {self.root_url}` with the same --vae to rebuild the index from the shard's footer"
            )
        for r in range(len(self.records)):
            try:
                self._decode_rec(r)
            except DataError as err:
                errors.append(str(err))
        return errors
