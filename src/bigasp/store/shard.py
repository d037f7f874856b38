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

import contextlib
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
        try:
            self._f.write(HEAD.pack(MAGIC, layout.FORMAT_VERSION, len(hb)) + hb)
        except BaseException:  # e.g. a full disk: no temp file may outlive a failed writer
            self.abort()
            raise
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
        try:
            self._f.write(footer + TRAILER.pack(self._pos, len(footer), END_MAGIC))
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except BaseException:
            self.abort()
            raise
        os.replace(self.tmp, self.final)
        layout.fsync_dir(self.final.parent)
        table = index_rows(self.rel, self.bucket, self.compression, self.entries)
        layout.atomic_write_parquet(table, index_path(self.root, self.rel))
        return table

    def abort(self) -> None:
        if not self._f.closed:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
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


def read_shard_header(path: str | os.PathLike, fs=None) -> dict[str, Any]:
    """The header of a shard (a few hundred bytes read); `DataError` naming the file if damaged."""
    opener = fs.open if fs is not None else open
    try:
        with opener(str(path), "rb") as f:
            return _read_header(f, path)
    except OSError as err:
        raise DataError(f"{path} cannot be read ({err})") from None


def _read_header(f, path) -> dict[str, Any]:
    head = f.read(HEAD.size)
    magic, version, hlen = HEAD.unpack(head) if len(head) == HEAD.size else (b"", 0, 0)
    if magic != MAGIC:
        raise DataError(f"{path} is not a bigasp latent shard (bad magic); delete it and re-encode")
    if version != layout.FORMAT_VERSION:
        raise DataError(f"{path} has shard format {version}; this bigasp reads {layout.FORMAT_VERSION}")
    try:
        header = json.loads(f.read(hlen))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(
            f"{path} has a corrupt header ({err}); delete it and its index file and re-encode"
        ) from None
    if not isinstance(header, dict) or not all(
        k in header for k in ("bucket_height", "bucket_width", "compression")
    ):
        raise DataError(
            f"{path} has a corrupt header (fields missing); delete it and its index file and re-encode"
        )
    return header


ENCODING_KEYS = ("vae_id", "scaling_factor", "seed", "latent")


def encoding_of(header: dict[str, Any]) -> dict[str, Any]:
    """What makes two shards' latents interchangeable: the VAE (identity hash of its config and
    weights), the scaling factor, and the seed and mode of the latent draw. None = not recorded."""
    return {k: header.get(k) for k in ENCODING_KEYS}


def describe_encoding(enc: dict[str, Any]) -> str:
    vae = enc.get("vae_id") or "unrecorded"
    return (
        f"VAE {vae}, scaling {enc.get('scaling_factor')}, seed {enc.get('seed')}, latent {enc.get('latent')}"
    )


def read_shard_layout(path: str | os.PathLike, fs=None) -> tuple[dict[str, Any], list[RecordEntry]]:
    """Header and footer of a complete shard (no record bytes are read).

    Every problem is a `DataError` naming the file: a bad magic, a corrupt header or footer, a
    missing end marker (truncated), unreadable bytes."""
    opener = fs.open if fs is not None else open
    try:
        with opener(str(path), "rb") as f:
            header = _read_header(f, path)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size < TRAILER.size:
                raise DataError(f"{path} is truncated (no end marker); delete it and re-encode")
            f.seek(size - TRAILER.size)
            foff, flen, end = TRAILER.unpack(f.read(TRAILER.size))
            if end != END_MAGIC:
                raise DataError(f"{path} is truncated (no end marker); delete it and re-encode")
            if foff + flen + TRAILER.size != size:
                raise DataError(
                    f"{path} has a corrupt footer position; delete it and its index file and re-encode"
                )
            f.seek(foff)
            try:
                records = [RecordEntry(**r) for r in json.loads(f.read(flen))["records"]]
            except (ValueError, UnicodeDecodeError, KeyError, TypeError) as err:
                raise DataError(
                    f"{path} has a corrupt footer ({type(err).__name__}: {err}); delete it and its index file "
                    "and re-encode"
                ) from None
    except OSError as err:
        raise DataError(f"{path} cannot be read ({err})") from None
    return header, records


def verify_shard_layout(
    path: str, header: dict[str, Any], records: list[RecordEntry], index_rows: list[dict]
) -> list[str]:
    """Disagreements between a shard's own header/footer and the index rows that point into it."""
    errors = []
    by_record = {int(r["record"]): r for r in index_rows}
    if len(records) != len(by_record) and by_record:
        errors.append(f"{path}: footer lists {len(records)} records, the index {len(by_record)}")
    for i, row in sorted(by_record.items()):
        if i >= len(records):
            errors.append(f"{path} record {i}: in the index but not in the shard's footer")
            continue
        e = records[i]
        if (e.id, e.offset, e.length, e.crc32) != (row["id"], row["offset"], row["length"], row["crc32"]):
            errors.append(
                f"{path} record {i}: footer and index disagree (id/offset/length/crc32); re-encode this shard"
            )
    first = index_rows[0] if index_rows else None
    bucket = (header.get("bucket_height"), header.get("bucket_width"))
    if first is not None and bucket != (first["bucket_height"], first["bucket_width"]):
        errors.append(f"{path}: header bucket differs from the index's")
    if index_rows and header.get("compression") != index_rows[0]["compression"]:
        errors.append(f"{path}: header compression {header.get('compression')!r} differs from the index's")
    return errors


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
