"""Schemas of the dataset's tables (manifest, rejects, latent index) and their readers.

Keeping the Arrow schemas in one place is what lets ingest, encode, the training loader
and `bigasp dataset info` agree on column names and types without importing each other.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from bigasp.errors import DataError
from bigasp.store import layout, reach

# One row per unique image (content hash). Annotation columns are nullable: unknown != 0.
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # blake2b-128 hex of the file bytes
        pa.field("path", pa.string()),  # where it was first seen; tar members as "a.tar::member"
        pa.field("tar_offset", pa.int64()),  # byte offset of a tar member's data (null for plain files)
        pa.field("file_size", pa.int64()),
        pa.field("mtime", pa.float64()),  # of the file (or tar) when ingested; incremental re-runs
        pa.field("format", pa.string()),  # Pillow format name: JPEG, PNG, WEBP, ...
        pa.field("mode", pa.string()),  # Pillow mode before conversion to RGB
        pa.field("width", pa.int32()),  # logical size, AFTER EXIF orientation
        pa.field("height", pa.int32()),
        pa.field("orientation", pa.int8()),  # EXIF orientation tag (1 = none)
        pa.field("captions", pa.list_(pa.string())),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("score", pa.int8()),  # 0..9, null = unscored
        pa.field("source", pa.string()),
        pa.field("watermark", pa.bool_()),
        pa.field("extra", pa.string()),  # JSON object text: sidecar keys we do not interpret
        # every source path holding these bytes, sorted; `path` is the first. Null in manifests
        # written before this column existed: read it as [path].
        pa.field("paths", pa.list_(pa.string())),
        # Parquet sources: the image is row `row` (0-based, over the whole file) of the Parquet file,
        # `path` = "photos.parquet::column[row]"; null for files and tar members (and older manifests).
        pa.field("row", pa.int64()),
    ]
)

# One row per accepted source path (a file, or a tar member): what that copy's sidecars said
# and the change key that lets a re-run reuse it without reading it. The manifest is derived
# from it (rows grouped by id, copies merged), so it is what incremental ingest updates.
SOURCES = "sources.parquet"
SOURCES_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("origin", pa.string()),  # the ingest source it was found through
        pa.field("change_key", pa.string()),  # image + sidecar sizes and mtimes, hashed
        *(MANIFEST_SCHEMA.field(c) for c in MANIFEST_SCHEMA.names if c not in ("path", "paths")),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("file_size", pa.int64()),
        pa.field("mtime", pa.float64()),
        pa.field("id", pa.string()),  # for duplicates: the id already in the manifest
        pa.field("stage", pa.string()),  # ingest | encode
        pa.field("origin", pa.string()),  # ingest: the source it was found through
        pa.field("change_key", pa.string()),  # ingest: re-examined when the file or its sidecars change
        pa.field("settings", pa.string()),  # ingest: JSON of the settings the reason depends on
    ]
)

# One row per stored latent; written next to each finished shard (latents/index/).
INDEX_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("shard", pa.string()),  # path relative to the dataset root
        pa.field("record", pa.int32()),
        pa.field("offset", pa.int64()),
        pa.field("length", pa.int64()),
        pa.field("crc32", pa.int64()),  # zlib.crc32 of the stored (possibly compressed) bytes
        pa.field("compression", pa.string()),  # none | zstd
        pa.field("bucket_height", pa.int32()),
        pa.field("bucket_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("crop_top", pa.int32()),
        pa.field("crop_left", pa.int32()),
        # Latent variant (another random crop and VAE sample of the same image); null in index files
        # written before variants existed = variant 0.
        pa.field("variant", pa.int32()),
    ]
)


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table` to `schema` (missing nullable columns become null)."""
    cols = []
    for field in schema:
        if field.name in table.column_names:
            cols.append(table.column(field.name).cast(field.type))
        else:
            cols.append(pa.nulls(len(table), field.type))
    return pa.Table.from_arrays(cols, schema=schema)


def load_dataset_json(raw: bytes, path) -> dict[str, Any]:
    """Parse dataset.json; a damaged one is a one-line DataError, never a traceback."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DataError(
            f"{path} is not valid JSON ({type(err).__name__}: {str(err)[:100]}); restore it from a backup "
            "or ingest into a new dataset folder"
        ) from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object; restore it or ingest into a new dataset folder")
    return meta


def read_dataset_json(fs, root: str) -> dict[str, Any]:
    path = f"{root}/{layout.DATASET_JSON}"
    local = layout.is_local(fs)
    url = root if local else fs.unstrip_protocol(root)
    try:
        exists = fs.exists(path)
        if not exists and not local:
            reach.check_bucket(fs, root, url)
        if exists:
            with fs.open(path, "rb") as f:
                raw = f.read()
    except DataError:
        raise
    except Exception as err:  # object storage: unreachable, no credentials, access denied
        failure = None if local else reach.storage_error(err, fs, url)
        if failure is None:
            raise
        raise failure from None
    if not exists:
        raise DataError(
            f"{url} is not a bigasp dataset ({layout.DATASET_JSON} missing); create it with `bigasp ingest`"
        )
    meta = load_dataset_json(raw, path)
    version = meta.get("format_version")
    if version != layout.FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {version}; this bigasp reads version {layout.FORMAT_VERSION}. "
            "Re-ingest the images or use a matching bigasp version."
        )
    return meta


MANIFEST_FIX = (
    "re-run `bigasp ingest` with the same sources and --out: it rebuilds the manifest from sources.parquet "
    "(or restore the file from a backup)"
)
REJECTS_FIX = (
    "delete it and re-run `bigasp ingest` (or `bigasp encode`): the rejected files are examined again"
)


def read_manifest(fs, root: str, columns: list[str] | None = None) -> pa.Table:
    """The manifest (or only `columns` of it: encode needs 7 of 16 at 10M+ rows)."""
    path = f"{root}/{layout.MANIFEST}"
    schema = MANIFEST_SCHEMA if columns is None else pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
    if not fs.exists(path):
        return empty(schema)
    import pyarrow.parquet as pq

    with layout.parquet_reading(path, MANIFEST_FIX), fs.open(path, "rb") as f:
        have = set(pq.read_schema(f).names)
        f.seek(0)
        table = pq.read_table(f, columns=[c for c in schema.names if c in have])
    return conform(table, schema)


def read_rejects(fs, root: str) -> pa.Table:
    """Ingest rejects plus every encode rejects file."""
    tables = []
    path = f"{root}/{layout.REJECTS}"
    if fs.exists(path):
        tables.append(conform(layout.read_parquet(fs, path, REJECTS_FIX), REJECTS_SCHEMA))
    for p in sorted(fs.glob(f"{root}/{layout.ENCODE_REJECTS_DIR}/*.parquet")):
        if layout.visible(p):
            tables.append(conform(layout.read_parquet(fs, p, REJECTS_FIX), REJECTS_SCHEMA))
    return pa.concat_tables(tables) if tables else empty(REJECTS_SCHEMA)


def index_files(fs, root: str) -> list[str]:
    """Names (not paths) of the committed latent index files, sorted: one per published shard."""
    return sorted(
        p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/{layout.INDEX_DIR}/*.parquet") if layout.visible(p)
    )


def read_index(fs, root: str, names: list[str] | None = None) -> pa.Table:
    """All committed latent index files (or just the files `names`), one row per (id, variant)
    (first shard name wins), sorted by id then variant; `variant` is never null (older files: 0)."""
    paths = [f"{root}/{layout.INDEX_DIR}/{n}" for n in (index_files(fs, root) if names is None else names)]
    if not paths:
        return empty(INDEX_SCHEMA)
    fix = layout.index_fix(root if layout.is_local(fs) else fs.unstrip_protocol(root))
    table = pa.concat_tables(conform(layout.read_parquet(fs, p, fix), INDEX_SCHEMA) for p in paths)
    table = table.set_column(
        table.schema.get_field_index("variant"),
        INDEX_SCHEMA.field("variant"),
        pc.fill_null(table.column("variant"), 0),
    )
    table = table.sort_by(
        [("id", "ascending"), ("variant", "ascending"), ("shard", "ascending"), ("record", "ascending")]
    ).combine_chunks()
    ids = table.column("id")
    if len(ids) > 1:
        var = table.column("variant")
        first = pc.or_(
            pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1)),
            pc.not_equal(var.slice(1), var.slice(0, len(var) - 1)),
        )
        keep = pa.concat_arrays([pa.array([True]), first.combine_chunks()])
        if not pc.all(keep).as_py():
            table = table.filter(keep)
    return table


def init_dataset(root, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create (or update) `dataset.json` in a local dataset directory; returns its content.

    Keys already present are kept unless `extra` replaces them, so re-running ingest with new
    options does not silently drop what the first run recorded.
    """
    from pathlib import Path

    path = Path(root) / layout.DATASET_JSON
    meta: dict[str, Any] = {}
    if path.exists():
        meta = load_dataset_json(path.read_bytes(), path)
        if meta.get("format_version") != layout.FORMAT_VERSION:
            raise DataError(
                f"{path} has format_version {meta.get('format_version')}; this bigasp writes version "
                f"{layout.FORMAT_VERSION}. Ingest into a new directory."
            )
    meta.update({"format_version": layout.FORMAT_VERSION, "kind": "bigasp-dataset", **(extra or {})})
    layout.atomic_write_bytes(path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return meta


MANIFEST_LOCK = ".ingest.lock"  # every writer of manifest.parquet holds it: ingest, annotate merge, quality


@contextlib.contextmanager
def manifest_lock(root, *, wait_s: float = 0.0, holder: str = "another bigasp command") -> Iterator[None]:
    """Exclusive lock on a local dataset's manifest for a read-modify-write.

    Ingest rebuilds the manifest from its sources table while merge and quality scoring
    rewrite columns of it; without one lock a concurrent pair would silently drop one side's
    changes. `wait_s` > 0 waits that long for the holder to finish, else fails at once.
    """
    import fcntl
    import time
    from pathlib import Path

    f = open(Path(root) / MANIFEST_LOCK, "w")  # noqa: SIM115 - held for the whole update
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DataError(
                        f"{root} is being written by {holder} (lock {MANIFEST_LOCK}); retry when it ends"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        f.close()
