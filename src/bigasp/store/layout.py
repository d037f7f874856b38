"""Where things live inside a dataset directory, and how we write them atomically.

The dataset directory is the only interface between ingest, encode and training, so its
layout is spelled out once here (and in docs/formats.md). Readers go through fsspec, so a
dataset synced to object storage reads with the same code; writers are local-path only
(write locally, then copy the directory) because rename-based atomicity needs a POSIX disk.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from bigasp.errors import DataError
from bigasp.fsutil import atomic_path, atomic_write_bytes, fsync_dir, tmp_sibling

__all__ = ["atomic_write_bytes", "atomic_write_parquet", "fsync_dir", "tmp_name"]

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
    try:
        fs, path = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
    except ImportError as err:  # fsspec names the package: "Install s3fs to access S3"
        protocol = str(root).split("://", 1)[0]
        raise DataError(
            f"{root}: reading {protocol}:// needs an extra package ({err}); pip install it in bigasp's "
            f"environment (e.g. `pip install {_FS_PACKAGES.get(protocol, 'the fsspec backend for ' + protocol)}`)"
        ) from None
    except ValueError as err:
        raise DataError(
            f"{root}: {err}; use a local path or an fsspec URL such as s3://bucket/dataset"
        ) from None
    return fs, path.rstrip("/")


_FS_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


tmp_name = tmp_sibling  # readers ignore names starting with '.'


def atomic_write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a Parquet file so that readers see either the old file or the whole new one."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def visible(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".")
