"""The latent shard file: many fp16 latents of one bucket, random access by offset.

Layout (all integers little-endian), format version 1:

    magic b"BIGASPLS" | u32 version | u32 header_len | header JSON
    record 0 bytes | record 1 bytes | ...            (raw fp16 C-order, or one zstd frame each)
    footer JSON (per-record id, offset, length, crc32, original size, crop)
    u64 footer_offset | u32 footer_len | magic b"BLSE"

The offset table lives in two places: the shard's own footer (so a shard is
self-describing and its index can be rebuilt) and the Parquet index the trainer reads (so
opening a dataset never touches shard bytes). Each record is checksummed and compressed
alone, so reading one latent never reads or decompresses its neighbours.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bigasp.errors import DataError
from bigasp.store import layout
from bigasp.store.manifest import INDEX_SCHEMA

MAGIC = b"BIGASPLS"
END_MAGIC = b"BLSE"
HEAD = struct.Struct("<8sII")
TRAILER = struct.Struct("<QI4s")
COMPRESSIONS = ("none", "zstd")


@dataclass
class RecordMeta:
    """What the trainer needs besides the latent: SDXL's size/crop conditioning."""

    id: str
    original_height: int
    original_width: int
    crop_top: int
    crop_left: int


@dataclass
class RecordEntry(RecordMeta):
    offset: int
    length: int
    crc32: int


def encode_record(latent: np.ndarray, compression: str, level: int, cctx=None) -> bytes:
    """Stored bytes of one latent. zstd first byte-shuffles the fp16 values (all low bytes,
    then all high bytes): sign/exponent bytes of neighbouring values are alike and compress
    well, the mantissa bytes are noise; unshuffled, zstd finds little of that structure."""
    arr = np.ascontiguousarray(latent, dtype=np.float16)
    if compression == "none":
        return arr.tobytes()
    if compression == "zstd":
        import zstandard

        u16 = arr.reshape(-1).view(np.uint16)  # little-endian: low byte = mantissa
        shuffled = (u16 & 0xFF).astype(np.uint8).tobytes() + (u16 >> 8).astype(np.uint8).tobytes()
        return (cctx or zstandard.ZstdCompressor(level=level)).compress(shuffled)
    raise ValueError(f"unknown compression {compression!r}; choose one of {COMPRESSIONS}")


def decode_record(
    data: bytes, compression: str, shape: tuple[int, ...], *, dctx=None, where: str = "record"
) -> np.ndarray:
    if compression == "zstd":
        import zstandard

        try:
            data = (dctx or zstandard.ZstdDecompressor()).decompress(data)
        except zstandard.ZstdError as err:
            raise DataError(f"{where}: zstd payload is corrupt ({err}); re-encode this shard") from None
    elif compression != "none":
        raise DataError(f"{where}: unknown compression {compression!r}")
    expected = int(np.prod(shape)) * 2
    if len(data) != expected:
        raise DataError(f"{where}: payload has {len(data)} bytes, expected {expected} for shape {shape}")
    if compression == "zstd":  # undo the byte shuffle: all low bytes, then all high bytes
        b = np.frombuffer(data, dtype=np.uint8)
        n = b.size // 2
        u16 = b[:n].astype(np.uint16) | (b[n:].astype(np.uint16) << 8)
        return u16.view(np.float16).reshape(shape)
    return np.frombuffer(data, dtype=np.float16).reshape(shape)


def check_crc(data: bytes, crc: int, where: str) -> None:
    got = zlib.crc32(data) & 0xFFFFFFFF
    if got != crc:
        raise DataError(
            f"checksum mismatch in {where} (stored crc32 {crc:08x}, computed {got:08x}): the file is "
            "corrupt or truncated; delete this shard and its index file and re-run `bigasp encode` to redo it"
        )


class ShardWriter:
    """Streams records into a hidden temp file; `close()` makes the shard and its index visible.

    Order of commit: shard bytes + footer -> fsync -> rename to the final name -> index Parquet
    (itself temp + rename). A crash before the index rename leaves a complete shard without an
    index, which `rebuild_missing_indexes` repairs from the footer; nothing partial is ever visible.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        stem: str,
        bucket_height: int,
        bucket_width: int,
        *,
        channels: int = 4,
        compression: str = "none",
        level: int = 3,
        header: dict[str, Any] | None = None,
    ):
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; choose one of {COMPRESSIONS}")
        self.root = Path(root)
        self.rel = f"{layout.SHARDS_DIR}/{bucket_width}x{bucket_height}/{stem}{layout.SHARD_SUFFIX}"
        self.final = self.root / self.rel
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = layout.tmp_name(self.final)
        self.shape = (channels, bucket_height // 8, bucket_width // 8)
        self.bucket = (bucket_height, bucket_width)
        self.compression = compression
        self.level = level
        self._cctx = None
        if compression == "zstd":
            import zstandard

            self._cctx = zstandard.ZstdCompressor(level=level)
        head = {
            "format_version": layout.FORMAT_VERSION,
            "bucket_height": bucket_height,
            "bucket_width": bucket_width,
            "shape": list(self.shape),
            "dtype": "float16",
            "compression": compression,
            **(header or {}),
        }
        hb = json.dumps(head, sort_keys=True).encode()
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._f.write(HEAD.pack(MAGIC, layout.FORMAT_VERSION, len(hb)) + hb)
        self._pos = HEAD.size + len(hb)
        self.entries: list[RecordEntry] = []

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def bytes_written(self) -> int:
        return self._pos

    def add(self, latent: np.ndarray, meta: RecordMeta) -> None:
        if tuple(latent.shape) != self.shape:
            raise ValueError(f"latent shape {tuple(latent.shape)} != shard shape {self.shape}")
        data = encode_record(latent, self.compression, self.level, self._cctx)
        self._f.write(data)
        self.entries.append(
            RecordEntry(
                **asdict(meta), offset=self._pos, length=len(data), crc32=zlib.crc32(data) & 0xFFFFFFFF
            )
        )
        self._pos += len(data)

    def close(self) -> pa.Table:
        """Finish the shard and its index; returns the index rows."""
        footer = json.dumps({"records": [asdict(e) for e in self.entries]}).encode()
        self._f.write(footer + TRAILER.pack(self._pos, len(footer), END_MAGIC))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.final)
        layout.fsync_dir(self.final.parent)
        table = index_rows(self.rel, self.bucket, self.compression, self.entries)
        layout.atomic_write_parquet(table, index_path(self.root, self.rel))
        return table

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self.tmp.exists():
            self.tmp.unlink()


def index_path(root: Path, shard_rel: str) -> Path:
    return root / layout.INDEX_DIR / (Path(shard_rel).stem + ".parquet")


def index_rows(
    shard_rel: str, bucket: tuple[int, int], compression: str, entries: Iterable[RecordEntry]
) -> pa.Table:
    entries = list(entries)
    n = len(entries)
    cols = {
        "id": [e.id for e in entries],
        "shard": [shard_rel] * n,
        "record": list(range(n)),
        "offset": [e.offset for e in entries],
        "length": [e.length for e in entries],
        "crc32": [e.crc32 for e in entries],
        "compression": [compression] * n,
        "bucket_height": [bucket[0]] * n,
        "bucket_width": [bucket[1]] * n,
        "original_height": [e.original_height for e in entries],
        "original_width": [e.original_width for e in entries],
        "crop_top": [e.crop_top for e in entries],
        "crop_left": [e.crop_left for e in entries],
    }
    return pa.Table.from_pydict(cols, schema=INDEX_SCHEMA)


def read_shard_layout(path: str | os.PathLike) -> tuple[dict[str, Any], list[RecordEntry]]:
    """Header and footer of a complete local shard (no record bytes are read)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(HEAD.size)
        magic, version, hlen = HEAD.unpack(head) if len(head) == HEAD.size else (b"", 0, 0)
        if magic != MAGIC:
            raise DataError(f"{path} is not a bigasp latent shard (bad magic); delete it and re-encode")
        if version != layout.FORMAT_VERSION:
            raise DataError(f"{path} has shard format {version}; this bigasp reads {layout.FORMAT_VERSION}")
        header = json.loads(f.read(hlen))
        f.seek(-TRAILER.size, os.SEEK_END)
        foff, flen, end = TRAILER.unpack(f.read(TRAILER.size))
        if end != END_MAGIC:
            raise DataError(f"{path} is truncated (no end marker); delete it and re-encode")
        f.seek(foff)
        records = json.loads(f.read(flen))["records"]
    return header, [RecordEntry(**r) for r in records]


def rebuild_index(root: str | os.PathLike, shard_rel: str) -> pa.Table:
    """Recreate a shard's index file from its footer (after a crash between the two renames)."""
    root = Path(root)
    header, entries = read_shard_layout(root / shard_rel)
    table = index_rows(
        shard_rel, (header["bucket_height"], header["bucket_width"]), header["compression"], entries
    )
    layout.atomic_write_parquet(table, index_path(root, shard_rel))
    return table


def rebuild_missing_indexes(root: str | os.PathLike, skip_prefix: str | None = None) -> list[str]:
    """Index every complete shard that has none; returns the repaired shard paths."""
    root = Path(root)
    repaired = []
    for shard in sorted((root / layout.SHARDS_DIR).glob(f"*/*{layout.SHARD_SUFFIX}")):
        if shard.name.startswith(".") or (skip_prefix and shard.name.startswith(skip_prefix)):
            continue
        rel = shard.relative_to(root).as_posix()
        if not index_path(root, rel).exists():
            rebuild_index(root, rel)
            repaired.append(rel)
    return repaired
