"""`StreamingLatentDataset`: a `LatentDataset` that grows while `bigasp encode` is still writing.

It opens empty and `grow(index files)` takes in the shards an encoder has published since:
images whose first latent (variant 0) a file holds become new rows, appended after the existing
ones (sorted by id within the call), so rows never move and every key `(seed, epoch, row)` stays
valid while the dataset grows. Other variants join their image's row whenever they arrive.

When the encoder is slower than training, every wave is one shard: a 13M-image dataset is
thousands of `grow` calls, and a resume replays all of them before its first step. So a call
costs what the new files hold, never what the dataset holds so far: record columns live in
amortised-growth numpy buffers, the table is a view of the manifest (`RowTable`: row -> manifest
position, no copy), and ids are looked up in the (fixed) manifest through a sorted array of
64-bit id hashes instead of a hash join of the whole dataset (`bigasp bench stream` measures it;
docs/PERFORMANCE.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bigasp.errors import DataError
from bigasp.store import layout
from bigasp.store.manifest import INDEX_SCHEMA, index_files, read_manifest, read_rejects
from bigasp.store.reader import INDEX_COLUMNS, LatentDataset

MAX_VARIANTS = 32  # per image; variant v is bit v of a per-image mask


class Grow:
    """A numpy column that appends in amortised O(len(values)); `.view` is its filled part."""

    def __init__(self, dtype, capacity: int = 1024):
        self._buf = np.zeros(max(int(capacity), 1), dtype=dtype)
        self.n = 0

    def append(self, values) -> None:
        values = np.asarray(values, dtype=self._buf.dtype)
        end = self.n + len(values)
        if end > len(self._buf):
            buf = np.zeros(max(end, 2 * len(self._buf)), dtype=self._buf.dtype)
            buf[: self.n] = self._buf[: self.n]
            self._buf = buf
        self._buf[self.n : end] = values
        self.n = end

    @property
    def view(self) -> np.ndarray:
        return self._buf[: self.n]

    def __getstate__(self):  # ship the filled part only to DataLoader workers
        return {"_buf": self._buf[: self.n].copy(), "n": self.n}


def id_keys(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 hash of each image id, to find ids in the manifest by binary search."""
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes
    out = np.empty(len(ids), dtype=np.uint64)
    at = 0
    for chunk in ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]:
        values = chunk.cast(pa.binary()).to_pylist()
        out[at : at + len(values)] = [
            from_bytes(blake2b(v, digest_size=8, person=b"bigasp-lookup").digest(), "little") for v in values
        ]
        at += len(values)
    return out


_RECORD_COLUMNS = {  # index column -> dtype of its buffer (the index file's own types)
    "record": np.int32,
    "offset": np.int64,
    "length": np.int64,
    "crc32": np.int64,
    "bucket_height": np.int32,
    "bucket_width": np.int32,
    "original_height": np.int32,
    "original_width": np.int32,
    "crop_top": np.int32,
    "crop_left": np.int32,
    "variant": np.int32,
}


class RowTable:
    """The dataset table of a `StreamingLatentDataset`, without a copy of the manifest: row r is
    manifest row `mpos[r]` with the index columns of its variant-0 record. It answers the table
    calls the training data path makes (`column_names`, `select`, `take`, `slice`, `column`,
    `len`); each returns a real `pa.Table` / array built for just the rows asked for."""

    def __init__(self, ds: StreamingLatentDataset, names: list[str] | None = None):
        self._ds = ds
        self.column_names = list(names) if names is not None else [*ds.manifest.column_names, *INDEX_COLUMNS]

    def __len__(self) -> int:
        return len(self._ds)

    @property
    def num_rows(self) -> int:
        return len(self._ds)

    def select(self, names) -> RowTable:
        missing = [n for n in names if n not in self.column_names]
        if missing:
            raise KeyError(f"no column(s) {missing} in the dataset table")
        return RowTable(self._ds, list(names))

    def take(self, indices) -> pa.Table:
        if isinstance(indices, pa.Array | pa.ChunkedArray):
            indices = indices.to_numpy(zero_copy_only=False)
        idx = np.asarray(indices, dtype=np.int64)
        n = len(self._ds)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for a dataset of {n} rows")
        ds = self._ds
        kept = [c for c in self.column_names if c not in INDEX_COLUMNS]
        out = ds.manifest.select(kept).take(pa.array(ds._mpos.view[idx]))
        recs = ds._first[idx]
        for name in (c for c in self.column_names if c in INDEX_COLUMNS):
            field = INDEX_SCHEMA.field(name)
            if name == "shard":
                values = pa.array([ds.shards[k] for k in ds._shard_idx[recs].tolist()], pa.string())
            elif name == "compression":
                values = pa.array(np.where(ds._zstd[recs], "zstd", "none"), pa.string())
            else:
                values = pa.array(ds._cols[name].view[recs]).cast(field.type)
            out = out.append_column(field, values)
        return out.select(self.column_names)

    def slice(self, offset: int = 0, length: int | None = None) -> pa.Table:
        end = len(self) if length is None else min(len(self), offset + length)
        return self.take(np.arange(offset, end, dtype=np.int64))

    def column(self, name: str) -> pa.ChunkedArray:
        return self.select([name]).slice(0).column(name)

    def to_table(self) -> pa.Table:
        return self.slice(0)


class StreamingLatentDataset(LatentDataset):
    """See the module notes. Reads (`read_latent`, `crop_of`, `prefetch`, the cache) are the
    `LatentDataset` ones; `rec(i, v)` finds variant v of row i among records kept in arrival order."""

    streaming = True

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
        self.manifest = read_manifest(fs, self.root)
        self.n_images = len(self.manifest)
        self.n_orphan_latents = 0
        self.index_files_taken: list[str] = []
        self._taken: set[str] = set()
        keys = id_keys(self.manifest.column("id"))
        self._key_order = np.argsort(keys, kind="stable")
        self._keys_sorted = keys[self._key_order]
        self._row_of = np.full(len(self.manifest), -1, np.int64)  # manifest position -> row
        self._var_mask = np.zeros(len(self.manifest), np.uint32)  # manifest position -> variants held
        self._pending: dict[int, list[int]] = {}  # manifest position (no row yet) -> its records
        rows = len(self.manifest)  # at most one row per ingested image: no regrowth
        self._mpos = Grow(np.int64, rows)  # row -> manifest position
        self._first_g = Grow(np.int64, rows)  # row -> record of its variant 0
        self._n_var = Grow(np.int32, rows)
        self._cols = {name: Grow(dtype) for name, dtype in _RECORD_COLUMNS.items()}
        self._rec_row = Grow(np.int64)  # record -> row (-1 while its image has no row yet)
        self._rec_shard = Grow(np.int32)
        self._rec_zstd = Grow(bool)
        self.shards: list[str] = []
        self._shard_pos: dict[str, int] = {}
        self._vlookup: tuple[np.ndarray, np.ndarray] | None = None  # sorted (row*32+v) keys, records
        self._staged: tuple[list[str], pa.Table] | None = None  # index files read, not yet taken in
        self.table = RowTable(self)
        self._publish_views()
        self._setup_reads(cache_dir, cache_bytes, retries, retry_wait)

    # -- what the reads use ------------------------------------------------------------------------
    def _publish_views(self) -> None:
        c = self._cols
        self._offset, self._length, self._crc = c["offset"].view, c["length"].view, c["crc32"].view
        self._bh, self._bw, self._record = c["bucket_height"].view, c["bucket_width"].view, c["record"].view
        self._crop_top, self._crop_left, self._variant = (
            c["crop_top"].view,
            c["crop_left"].view,
            c["variant"].view,
        )
        self._shard_idx, self._zstd = self._rec_shard.view, self._rec_zstd.view
        self._first, self.n_variants = self._first_g.view, self._n_var.view
        self._vlookup = None

    def __len__(self) -> int:
        return self._mpos.n

    def rec(self, i: int, variant: int = 0) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for a dataset of {len(self)} latents")
        if not 0 <= variant < self.n_variants[i]:
            raise IndexError(f"row {i} has {int(self.n_variants[i])} latent variant(s), not {variant + 1}")
        if variant == 0:
            return int(self._first[i])
        if self._vlookup is None:
            rows = self._rec_row.view
            keys = rows * MAX_VARIANTS + self._variant.astype(np.int64)
            order = np.argsort(keys, kind="stable")
            self._vlookup = (keys[order], order)
        keys, order = self._vlookup
        return int(order[np.searchsorted(keys, i * MAX_VARIANTS + variant)])

    @property
    def records(self) -> pa.Table:
        """Every record taken in (arrival order), as index rows."""
        n = self._rec_row.n
        ids = self.manifest.column("id").take(pa.array(self._mpos.view[np.maximum(self._rec_row.view, 0)]))
        cols = {"id": ids, "shard": pa.array([self.shards[s] for s in self._shard_idx], pa.string())}
        cols |= {k: pa.array(g.view) for k, g in self._cols.items()}
        cols["compression"] = pa.array(np.where(self._zstd, "zstd", "none"), pa.string())
        return pa.table(cols).slice(0, n)

    # -- growing -----------------------------------------------------------------------------------
    def published_index_files(self) -> list[str]:
        """Index files committed now (one per published shard), sorted; listings are not cached."""
        with contextlib.suppress(Exception):  # object stores cache listings: see new index files
            self.fs.invalidate_cache(f"{self.root}/{layout.INDEX_DIR}")
        return index_files(self.fs, self.root)

    def shards_in(self, names: list[str]) -> list[str]:
        """The shards the index files `names` list (read once: `grow(names)` reuses the read)."""
        return pc.unique(self._read_index_files(names).column("shard")).to_pylist()

    def _read_index_files(self, names: list[str]) -> pa.Table:
        from bigasp.store.manifest import read_index

        if self._staged is not None and self._staged[0] == list(names):
            return self._staged[1]
        try:
            table = read_index(self.fs, self.root, list(names)).select(["id", *INDEX_COLUMNS, "variant"])
            self._staged = (list(names), table)
            return table
        except FileNotFoundError as err:
            raise DataError(
                f"{self.root}/{layout.INDEX_DIR}: an index file this run trained on is gone ({err}); restore it "
                "(with its shard) to resume exactly"
            ) from None

    def manifest_positions(self, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Position of each id in the manifest (-1: not ingested), by binary search on id hashes."""
        if len(ids) == 0:
            return np.zeros(0, np.int64)
        keys = id_keys(ids)
        at = np.minimum(np.searchsorted(self._keys_sorted, keys), len(self._keys_sorted) - 1)
        pos = (
            np.where(self._keys_sorted[at] == keys, self._key_order[at], -1)
            if len(self._keys_sorted)
            else (np.full(len(ids), -1))
        )
        hit = pos >= 0
        if hit.any():  # a 64-bit hash match is checked against the id itself (collisions: rare)
            manifest_ids = self.manifest.column("id")
            same = pc.equal(manifest_ids.take(pa.array(pos[hit])), ids.filter(pa.array(hit))).to_numpy(
                zero_copy_only=False
            )
            if not same.all():
                wrong = np.flatnonzero(hit)[~same]
                found = pc.fill_null(pc.index_in(ids.take(pa.array(wrong)), value_set=manifest_ids), -1)
                pos[wrong] = found.to_numpy(zero_copy_only=False)
        return pos.astype(np.int64)

    def grow(self, names: list[str]) -> np.ndarray:
        """Take in the index files `names`: returns the indices of the rows they added."""
        return self._take(names, new_rows=True)

    def refresh_variants(self) -> int:
        """Take in variants published since for the rows held (no new rows); see `LatentDataset`."""
        self._take([n for n in self.published_index_files() if n not in self._taken], new_rows=False)
        return self.complete_generations()

    def _take(self, names: list[str], *, new_rows: bool) -> np.ndarray:
        names = list(names)
        index = self._read_index_files(names)
        self._staged = None
        self.index_files_taken.extend(names)
        self._taken.update(names)
        start = len(self)
        if len(index):
            self._take_records(index, new_rows=new_rows)
        self._publish_views()
        return np.arange(start, len(self), dtype=np.int64)

    def _take_records(self, index: pa.Table, *, new_rows: bool) -> None:
        mpos = self.manifest_positions(index.column("id"))
        variant = index.column("variant").to_numpy(zero_copy_only=False).astype(np.int64)
        if (variant >= MAX_VARIANTS).any():
            raise DataError(
                f"{self.root}: a latent variant >= {MAX_VARIANTS}; a streaming run keeps at most {MAX_VARIANTS} per image"
            )
        keep = mpos >= 0  # an id not in the manifest (an orphan latent) is not trained on
        bit = np.left_shift(np.uint32(1), variant.astype(np.uint32))
        keep &= (self._var_mask[np.maximum(mpos, 0)] & bit) == 0  # first taken wins
        idx = np.flatnonzero(keep)
        # the same (image, variant) twice within these files: the first (index files in name order)
        pair = mpos[idx] * MAX_VARIANTS + variant[idx]
        _, first = np.unique(pair, return_index=True)
        idx = idx[np.sort(first)]
        if not len(idx):
            return
        index, mpos, variant = index.take(pa.array(idx)), mpos[idx], variant[idx]
        np.bitwise_or.at(self._var_mask, mpos, bit[idx])
        # new rows: images whose variant 0 arrives now, sorted by id
        is_new = (variant == 0) & (self._row_of[mpos] < 0) if new_rows else np.zeros(len(mpos), bool)
        new_at = np.flatnonzero(is_new)
        if len(new_at):
            new_at = new_at[
                np.argsort(np.asarray(index.column("id").take(pa.array(new_at)).to_pylist()), kind="stable")
            ]
            rows = np.arange(len(self), len(self) + len(new_at), dtype=np.int64)
            self._row_of[mpos[new_at]] = rows
            self._mpos.append(mpos[new_at])
        # records: appended in arrival order
        first_rec = self._rec_row.n
        rec_ids = np.arange(first_rec, first_rec + len(mpos), dtype=np.int64)
        for name, g in self._cols.items():
            g.append(index.column(name).to_numpy(zero_copy_only=False))
        self._rec_row.append(self._row_of[mpos])
        shard_col = index.column("shard").to_pylist()
        for s in dict.fromkeys(shard_col):
            if s not in self._shard_pos:
                self._shard_pos[s] = len(self.shards)
                self.shards.append(s)
        self._rec_shard.append(np.array([self._shard_pos[s] for s in shard_col], np.int32))
        self._rec_zstd.append(pc.equal(index.column("compression"), "zstd").to_numpy(zero_copy_only=False))
        rec_row = self._rec_row.view
        for k in np.flatnonzero(rec_row[rec_ids] < 0).tolist():  # records whose image has no row yet wait
            self._pending.setdefault(int(mpos[k]), []).append(int(rec_ids[k]))
        if len(new_at):
            self._first_g.append(rec_ids[new_at])
            self._n_var.append(np.zeros(len(new_at), np.int32))
            for p in mpos[new_at].tolist() if self._pending else ():
                for r in self._pending.pop(p, []):
                    rec_row[r] = self._row_of[p]
        # variants held in a row from 0 up (a gap waits for the missing generation)
        touched = np.unique(self._row_of[mpos])
        touched = touched[touched >= 0]
        m = self._var_mask[self._mpos.view[touched]].astype(np.uint64)
        lowest_zero = (~m) & (m + np.uint64(1))  # 2**k: variants 0..k-1 are held
        self._n_var.view[touched] = np.log2(lowest_zero.astype(np.float64)).astype(np.int32)

    def missing_latents(self) -> int:
        """Ingested images with neither a latent taken in nor an encode reject: what a streaming
        run still waits for (0 = the encode is complete)."""
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(f"{self.root}/{layout.ENCODE_REJECTS_DIR}")
        rej = read_rejects(self.fs, self.root)
        if "stage" in rej.column_names:
            rej = rej.filter(pc.equal(rej.column("stage"), "encode"))
        pos = self.manifest_positions(pc.unique(rej.column("id").combine_chunks().cast(pa.string())))
        pos = pos[pos >= 0]
        rejected_without_row = int((self._row_of[pos] < 0).sum())
        return self.n_images - len(self) - rejected_without_row

    def compact(self) -> None:
        """After the pass (no new rows from now on): the manifest in one chunk per column, which
        the `take`s of every later batch read faster."""
        self.manifest = self.manifest.combine_chunks()

    def __repr__(self) -> str:
        return f"StreamingLatentDataset({self.root_url!r}, {len(self)} latents taken in from {len(self.shards)} shards)"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_vlookup"] = None
        return state
