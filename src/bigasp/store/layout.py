"""Where things live inside a dataset directory, and how we write them atomically.

The dataset directory is the only interface between ingest, encode and training, so its
layout is spelled out once here (and in docs/formats.md). Readers go through fsspec, so a
dataset synced to object storage reads with the same code; writers are local-path only
(write locally, then copy the directory) because rename-based atomicity needs a POSIX disk.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1  # dataset directory + shard format; bump on any incompatible change

DATASET_JSON = "dataset.json"
MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
PARTS_DIR = "parts"  # ingest commits here first; folded into manifest/rejects at the end
LATENTS_DIR = "latents"
SHARDS_DIR = f"{LATENTS_DIR}/shards"
INDEX_DIR = f"{LATENTS_DIR}/index"
ENCODE_REJECTS_DIR = f"{LATENTS_DIR}/rejects"
SHARD_SUFFIX = ".bls"


def url_to_fs(root: str | os.PathLike, storage_options: dict[str, Any] | None = None):
    """(filesystem, path-without-protocol) for a local path or any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
    return fs, path.rstrip("/")


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def tmp_name(final: Path) -> Path:
    """A hidden sibling temp path; readers ignore names starting with '.'."""
    return final.with_name(f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a Parquet file so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def read_parquet(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def visible(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".")
