"""`LatentDataset`: the training-time view of a dataset directory.

Opening reads only Parquet (manifest + latent index); `read_latent(i)` reads exactly one
record's bytes at its recorded offset, verifies its checksum and decompresses it. File
handles are opened lazily per process and dropped on pickling, so the object can be handed
to DataLoader workers (fork or spawn) and to object-storage filesystems alike.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bigasp.errors import DataError
from bigasp.store import layout
from bigasp.store.manifest import read_dataset_json, read_index, read_manifest
from bigasp.store.shard import check_crc, decode_record

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


class LatentDataset:
    """Images that have a latent, sorted by id, with O(1) checksummed access to each latent."""

    def __init__(self, root: str | os.PathLike, *, storage_options: dict | None = None):
        self.root_url = str(root)
        self.storage_options = dict(storage_options or {})
        fs, self.root = layout.url_to_fs(self.root_url, self.storage_options)
        self._fs = fs
        self.meta = read_dataset_json(fs, self.root)
        manifest = read_manifest(fs, self.root)
        index = read_index(fs, self.root).select(["id", *INDEX_COLUMNS])
        self.n_images = len(manifest)  # ingested, with or without a latent
        self.table: pa.Table = join_latents(manifest, index)
        self.n_orphan_latents = len(index) - len(self.table)  # latents not in the manifest (ignored)
        shards = self.table.column("shard")
        self.shards: list[str] = pc.unique(shards).to_pylist() if len(self.table) else []
        self._shard_idx = (
            pc.index_in(shards, value_set=pa.array(self.shards, pa.string())).to_numpy(zero_copy_only=False)
            if len(self.table)
            else np.zeros(0, np.int32)
        ).astype(np.int32)
        self._offset = self.table.column("offset").to_numpy()
        self._length = self.table.column("length").to_numpy()
        self._crc = self.table.column("crc32").to_numpy()
        self._zstd = (
            pc.equal(self.table.column("compression"), "zstd").to_numpy(zero_copy_only=False).astype(bool)
        )
        self._bh = self.table.column("bucket_height").to_numpy()
        self._bw = self.table.column("bucket_width").to_numpy()
        self._record = self.table.column("record").to_numpy()
        self._local = layout.is_local(fs)
        self._fds: dict[int, int] = {}
        self._dctx = None

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"LatentDataset({self.root_url!r}, {len(self)} latents in {len(self.shards)} shards)"

    # Pickling: ship the arrays, not open files or decompressors.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"] = {}
        state["_dctx"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def latent_shape(self, i: int) -> tuple[int, int, int]:
        return (4, int(self._bh[i]) // 8, int(self._bw[i]) // 8)

    def _where(self, i: int) -> str:
        return f"shard {self.root}/{self.shards[self._shard_idx[i]]} record {int(self._record[i])}"

    def read_bytes(self, i: int) -> bytes:
        """The stored bytes of row `i` (compressed if the shard is), not yet verified."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for a dataset of {len(self)} latents")
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
                data = self._fs.cat_file(path, start=offset, end=offset + length)
            except FileNotFoundError:
                raise DataError(f"{path} is listed in the latent index but missing") from None
            except OSError as err:
                raise DataError(f"{self._where(i)}: read failed ({err})") from None
        if len(data) != length:
            raise DataError(f"{self._where(i)}: short read ({len(data)} of {length} bytes); file truncated")
        return data

    def read_latent(self, i: int):
        """float16 tensor [4, bucket_height//8, bucket_width//8], checksum-verified."""
        import torch

        return torch.from_numpy(self.read_latent_numpy(i))

    def read_latent_numpy(self, i: int) -> np.ndarray:
        data = self.read_bytes(i)
        where = self._where(i)
        check_crc(data, int(self._crc[i]), where)
        dctx = None
        if self._zstd[i]:
            if self._dctx is None:
                import zstandard

                self._dctx = zstandard.ZstdDecompressor()
            dctx = self._dctx
        arr = decode_record(
            data, "zstd" if self._zstd[i] else "none", self.latent_shape(i), dctx=dctx, where=where
        )
        return arr if arr.flags.writeable else arr.copy()  # writable, detached from the read buffer

    def shard_headers(self, limit: int | None = None) -> dict[str, dict[str, Any]]:
        """Header of each shard (or of `limit` shards spread over the list: on object storage every
        header is a request). A damaged header raises `DataError` naming the file."""
        from bigasp.store.shard import read_shard_header

        names = self.shards
        if limit is not None and len(names) > limit:
            step = len(names) / limit
            names = [names[int(k * step)] for k in range(limit)]
        return {n: read_shard_header(f"{self.root}/{n}", None if self._local else self._fs) for n in names}

    def verify(self) -> list[str]:
        """Check every shard's header and footer against the index, that all shards hold latents
        of one encoding (VAE, scaling, seed), and every record's checksum; one message per problem."""
        from bigasp.store.shard import (
            ENCODING_KEYS,
            describe_encoding,
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
        for r in self.table.select(keep).to_pylist():
            rows_of.setdefault(r["shard"], []).append(r)
        encodings: dict[tuple, list[str]] = {}
        for name in self.shards:
            path = f"{self.root}/{name}"
            try:
                header, records = read_shard_layout(path, None if self._local else self._fs)
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
        for i in range(len(self)):
            try:
                self.read_latent_numpy(i)
            except DataError as err:
                errors.append(str(err))
        return errors
