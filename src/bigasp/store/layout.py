"""Where things live inside a dataset directory, and how we write them atomically.

The dataset directory is the only interface between ingest, encode and training, so its
layout is spelled out once here (and in docs/formats.md). Readers go through fsspec, so a
dataset synced to object storage reads with the same code; writers are local-path only
use rename-based atomicity on a POSIX disk; on object storage a PUT is atomic (an object is
either absent or whole), so latents are written straight to the bucket (`write_parquet`,
`put_file`) and a shard becomes visible only once its index object is written.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
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
    try:
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
    except OSError as err:
        raise named_write_error(err, path) from None


def os_reason(err: OSError) -> str:
    """The plain reason of an OS error ("No space left on device"), also for pyarrow's wrapped
    "Error writing bytes to file. Detail: [errno 28] ..." messages."""
    if err.errno:
        return os.strerror(err.errno)
    return str(err.strerror or err)


def named_write_error(err: OSError, path: str | os.PathLike) -> OSError:
    """`err` with the file being written as its filename (pyarrow names none, or a temp file)."""
    if err.filename is not None and str(Path(err.filename).name) == Path(path).name:
        return err
    return type(err)(err.errno, f"{os_reason(err)} (writing {path})", str(path))


def write_failed(err: OSError, where: str | os.PathLike, kept: str, again: str) -> DataError:
    """One line for a write that failed on the machine's side (a full disk, a quota, a read-only
    mount): the file, the reason, what is kept, and how to continue (encode's wording)."""
    path = err.filename if err.filename is not None else where
    return DataError(
        f"writing {path} failed ({os_reason(err)}); {kept} and no partial file is left: free space (or fix the "
        f"disk) and {again}"
    )


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_parquet(fs, path: str, table: pa.Table) -> None:
    """Atomic Parquet write on either kind of filesystem: temp + rename on a local disk, one
    PUT (all or nothing) on object storage."""
    if is_local(fs):
        atomic_write_parquet(table, path)
    else:
        fs.pipe_file(path, parquet_bytes(table))


def write_bytes(fs, path: str, data: bytes) -> None:
    if is_local(fs):
        atomic_write_bytes(path, data)
    else:
        fs.pipe_file(path, data)


GENERIC_FIX = "restore it from a backup, or delete it and re-run the command that wrote it"


def index_fix(root: str) -> str:
    """What to do about a damaged latent index file (encode rebuilds a missing one)."""
    return (
        f"delete it and run `bigasp encode {root}` with the same --vae: encode rebuilds a shard's missing "
        "index from the shard's own footer"
    )


@contextlib.contextmanager
def parquet_reading(path: str | os.PathLike, fix: str = GENERIC_FIX):
    """Turn pyarrow's error for a truncated or garbled Parquet file (which names an open stream
    as `<Buffer>`, not the file) into one line naming the file and the fix."""
    try:
        yield
    except pa.ArrowException as err:
        reason = " ".join(str(err).split())
        reason = (
            reason.split(": ", 1)[-1] if reason.startswith("Could not open Parquet input source") else reason
        )
        raise DataError(f"{path} is damaged ({reason[:160]}); {fix}") from None


def read_parquet(fs, path: str, fix: str = GENERIC_FIX) -> pa.Table:
    with parquet_reading(path, fix), fs.open(path, "rb") as f:
        return pq.read_table(f)


def visible(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".")
