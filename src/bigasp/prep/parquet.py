"""Parquet files as an ingest source: one image per row, in a binary column or in a struct
column with a `bytes` field (the Hugging Face `Image` feature: {bytes, path}).

Each row becomes an `Item` whose `Ref` names the file, the row (0-based over the whole file)
and the image column; its other columns become that row's JSON sidecar, so a `caption`,
`tags`, `score`, ... column lands where `name.json` keys land, and every other column is kept
in the manifest's `extra`. `parquet_columns` renames columns to those keys (`text` ->
`caption`).

Reading a row reads only its row group, and only the columns asked for, through pyarrow's file
API on a file object (so the same code serves any file-like object). The last row group read is
kept per process: ingest visits rows in file order, so a row group is read once, not once per
row. Encode visits images in bucket order, so there each image read reads its row group again
(docs/datasets.md advises small row groups).
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from bigasp.prep.images import Reject
from bigasp.prep.sources import PARQUET_EXT, Item, Ref
from bigasp.store import remote

__all__ = ["PARQUET_EXT", "image_column", "read_cell", "row_sidecar", "scan_parquet"]

PREFERRED = ("image", "jpg", "png", "webp", "img", "jpeg")  # picked first when several columns qualify

IMAGE_COLUMN_FIX = "name it with --image-column NAME (key `parquet_image_column`)"


def is_image_type(t: pa.DataType) -> bool:
    """A column that can hold image bytes: binary, or a struct with a binary `bytes` field."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        return i >= 0 and (pa.types.is_binary(t.field(i).type) or pa.types.is_large_binary(t.field(i).type))
    return False


def image_column(schema: pa.Schema, name: str, file: str) -> str:
    """The image column of `schema`: `name` if given (it must exist and hold bytes), else the one
    binary / {bytes} struct column (preferring `image`, `jpg`, ... when several qualify).
    Raises `Reject("bad_parquet", ...)` naming the file, the column and the fix."""
    if name:
        if name not in schema.names:
            raise Reject(
                "bad_parquet",
                f"{file}: no column {name!r} (columns: {', '.join(schema.names)}); "
                "give the image column's name with --image-column",
            )
        if not is_image_type(schema.field(name).type):
            raise Reject(
                "bad_parquet",
                f"{file}: column {name!r} is {schema.field(name).type}, not image bytes (binary, or a struct "
                "with a binary `bytes` field); give the image column's name with --image-column",
            )
        return name
    found = [f.name for f in schema if is_image_type(f.type)]
    if not found:
        raise Reject(
            "bad_parquet",
            f"{file}: no image column (binary, or a struct with a binary `bytes` field) among "
            f"{', '.join(schema.names) or 'no columns'}; if the images are stored another way, "
            "convert them to bytes, else " + IMAGE_COLUMN_FIX,
        )
    if len(found) == 1:
        return found[0]
    for pref in PREFERRED:
        if pref in found:
            return pref
    raise Reject(
        "bad_parquet",
        f"{file}: several columns could hold the images ({', '.join(found)}); {IMAGE_COLUMN_FIX}",
    )


@dataclass
class _Opened:
    """A Parquet file's footer facts and the last row group read (per process)."""

    key: tuple[str, int, float]
    starts: list[int]  # first row of each row group
    rows: int
    schema: pa.Schema
    group: int = -1
    columns: tuple[str, ...] = ()
    table: pa.Table | None = None


_cache: dict[str, _Opened] = {}


# The only two ways this module touches a file: a binary file object for pyarrow, and the
# (size, mtime) stamp that says whether a cached footer / row group is still the file's.
def _open(file: str):
    """A seekable binary file: pyarrow reads the footer, then only the row groups it needs (at a
    URL, as ranged requests of 1 MiB blocks)."""
    if remote.is_url(file):
        fs, path = remote.filesystem(file)
        return remote.call(file, lambda: fs.open(path, "rb", block_size=1 << 20, cache_type="readahead"))
    return open(file, "rb")


def _stamp(file: str) -> tuple[int, float]:
    """(size, modification time) that say whether the file changed (at a URL: its LastModified)."""
    if remote.is_url(file):
        meta = remote.info(file)
        modified = meta.get("LastModified") or meta.get("mtime") or meta.get("last_modified")
        return int(meta.get("size") or 0), float(modified.timestamp()) if hasattr(
            modified, "timestamp"
        ) else 0.0
    st = os.stat(file)
    return st.st_size, st.st_mtime


def _footer(file: str) -> _Opened:
    import pyarrow.parquet as pq

    key = (file, *_stamp(file))
    got = _cache.get(file)
    if got is not None and got.key == key:
        return got
    with _open(file) as f:
        meta = pq.ParquetFile(f).metadata
        schema = meta.schema.to_arrow_schema()
    starts, n = [], 0
    for g in range(meta.num_row_groups):
        starts.append(n)
        n += meta.row_group(g).num_rows
    _cache.clear()  # one file at a time: memory stays one row group
    _cache[file] = got = _Opened(key, starts, n, schema)
    return got


def read_columns(file: str, row: int, columns: tuple[str, ...]) -> dict[str, Any]:
    """`columns` of row `row` of `file` as Python values (reads only that row group)."""
    import pyarrow.parquet as pq

    try:
        o = _footer(file)
    except (pa.ArrowException, ValueError) as err:
        raise Reject("bad_parquet", f"{file}: cannot read the Parquet footer ({err})") from None
    if not 0 <= row < o.rows:
        raise Reject(
            "changed_since_ingest",
            f"{file} has {o.rows} rows, no row {row} (changed since ingest?); re-run ingest",
        )
    g = bisect.bisect_right(o.starts, row) - 1
    if o.group != g or not set(columns) <= set(o.columns):
        try:
            with _open(file) as f:
                o.table = pq.ParquetFile(f).read_row_group(g, columns=list(columns))
        except (pa.ArrowException, ValueError, OSError) as err:
            raise Reject(
                "bad_parquet", f"{file}: cannot read row group {g} ({type(err).__name__}: {err})"
            ) from None
        o.group, o.columns = g, columns
    assert o.table is not None
    i = row - o.starts[g]
    return {c: o.table.column(c)[i].as_py() for c in columns}


def read_cell(file: str, row: int, column: str) -> bytes:
    """The image bytes of `row`: a binary cell, or the `bytes` field of a struct cell.

    A null cell, or a struct whose `bytes` is null (e.g. an image stored only as a path), is a
    `missing_image` reject naming the file, row and column."""
    value = read_columns(file, row, (column,))[column]
    where = ""
    if isinstance(value, dict):
        where = f", only a path {value['path']!r}" if value.get("path") else ""
        value = value.get("bytes")
    if value is None:
        raise Reject(
            "missing_image",
            f"{file}: row {row} has no image bytes in column {column!r} (null{where}); "
            "store the image's bytes there, or drop the row",
        )
    return value


def row_sidecar(file: str, row: int, image: str, rename: dict[str, str]) -> bytes:
    """The row's other columns as a JSON sidecar (bytes), columns renamed by `rename`; other
    image-like (binary) columns are left out. Values JSON cannot hold (dates, decimals) become
    text; NaN stays NaN, which the sidecar reader turns into null as for `name.json`."""
    o = _footer(file)
    cols = tuple(f.name for f in o.schema if f.name != image and not is_image_type(f.type))
    values = read_columns(file, row, (image, *cols)) if cols else {}
    out: dict[str, Any] = {}
    for c in cols:
        out[rename.get(c, c)] = values[c]
    return json.dumps(out, default=str, ensure_ascii=False).encode("utf-8")


def rows_of(file: str) -> tuple[int, pa.Schema]:
    """Row count and schema from the footer; `Reject("bad_parquet")` for a damaged file."""
    try:
        o = _footer(file)
    except (pa.ArrowException, ValueError) as err:
        raise Reject(
            "bad_parquet",
            f"{file}: not a readable Parquet file ({err}); re-create or re-download it",
        ) from None
    return o.rows, o.schema


def _metadata_table(schema: pa.Schema) -> bool:
    """img2dataset's per-shard `00000.parquet` (url, key, status, ... and no image): the table of a
    shard's downloads, whose images are in `00000.tar` next to it."""
    return {"key", "status"} <= set(schema.names)


def scan_parquet(path: str, origin: str, image: str = "", *, in_folder: bool = False) -> Iterator[Item]:
    """One `Item` per row of the Parquet file `path`; a file that cannot be read, or has no image
    column, is one `bad_parquet` item (`path::`). In a folder, img2dataset's metadata tables
    (no image column, `key` and `status` columns) are skipped: their images are in the tar."""
    try:
        size, mtime = _stamp(path)
    except OSError as err:
        yield Item(path, Ref(path, None, 0), 0.0, missing=True, error=str(err), origin=origin)
        return

    def problem(r: Reject) -> Item:
        return Item(
            f"{path}::", Ref(path, None, size), mtime, origin=origin, problem=r.reason, error=r.detail
        )

    try:
        n, schema = rows_of(path)
    except Reject as r:
        yield problem(r)
        return
    try:
        col = image_column(schema, image, path)
    except Reject as r:
        if not (in_folder and _metadata_table(schema)):
            yield problem(r)
        return
    for r in range(n):
        yield Item(
            f"{path}::{col}[{r}]",
            Ref(path, None, size, mtime, row=r, column=col),
            mtime,
            origin=origin,
        )
