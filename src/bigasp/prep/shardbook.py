"""Which tar shards at URLs were ingested whole, at which ETag: so a re-run does not fetch them.

Listing a tar's members needs its bytes, so without this record a re-run would download every
unchanged shard again just to find every member unchanged. `url_shards.parquet` holds one row
per shard read to its end-of-archive marker: its URL, its ETag (`version`), the settings that
decide how members are read (`settings`) and how many items it gave. A re-run skips a shard
whose ETag and settings are both unchanged (its members count as scanned and skipped, and stay
in the dataset); anything else is read again, member by member, as before.

A row is committed only after every member of its shard has been committed (the caller makes
sure of that), in `parts/shards-*.parquet` folded like the other parts, so a killed run never
records a shard whose members are not all in the dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bigasp.store import layout

SHARDS = "url_shards.parquet"
SHARDS_SCHEMA = pa.schema(
    [
        pa.field("url", pa.string(), nullable=False),  # the shard (no member)
        pa.field("version", pa.string()),  # its ETag when it was read whole
        pa.field("settings", pa.string()),  # JSON of the settings members were read with
        pa.field("members", pa.int64()),  # items it gave (images and problems)
    ]
)

Record = tuple[str, str, int]  # version, settings, members


def _table(path: Path) -> pa.Table:
    with layout.parquet_reading(path, "delete it: the next ingest reads those shards again"):
        return pq.read_table(path).select(SHARDS_SCHEMA.names).cast(SHARDS_SCHEMA)


def load(root: Path) -> dict[str, Record]:
    path = root / SHARDS
    return read_rows(path) if path.exists() else {}


def read_rows(path: Path) -> dict[str, Record]:
    t = _table(path).to_pydict()
    return {
        u: (v, s, m) for u, v, s, m in zip(t["url"], t["version"], t["settings"], t["members"], strict=True)
    }


def write_part(rows: list[dict], path: Path) -> None:
    layout.atomic_write_parquet(pa.Table.from_pylist(rows, schema=SHARDS_SCHEMA), path)


def fold(root: Path, parts: list[Path], drop: Callable[[str], bool] | None) -> None:
    """The record with `parts` applied in order (later wins), less the shards `drop` says are gone."""
    rows = load(root)
    for p in parts:
        rows.update(read_rows(p))
    if drop is not None:
        rows = {u: r for u, r in rows.items() if not drop(u)}
    if not rows and not (root / SHARDS).exists():
        return
    urls = sorted(rows)
    table = pa.Table.from_pydict(
        {
            "url": urls,
            "version": [rows[u][0] for u in urls],
            "settings": [rows[u][1] for u in urls],
            "members": [rows[u][2] for u in urls],
        },
        schema=SHARDS_SCHEMA,
    )
    layout.atomic_write_parquet(table, root / SHARDS)


class Book:
    """The scan's view of the record: `unchanged(url, version)` -> members to count as skipped
    (None = read it), and `finished(url, version, members)` when a shard was read whole."""

    def __init__(self, known: dict[str, Record], settings: str | None):
        self.known, self.settings = known, settings
        self.skipped: list[tuple[str, int]] = []
        self.finished_rows: list[dict] = []

    def unchanged(self, url: str, version: str) -> int | None:
        rec = self.known.get(url)
        if self.settings is None or rec is None or not version or rec[:2] != (version, self.settings):
            return None
        self.skipped.append((url, rec[2]))
        return rec[2]

    def finished(self, url: str, version: str, members: int) -> None:
        if self.settings is not None and version:
            self.finished_rows.append(
                {"url": url, "version": version, "settings": self.settings, "members": members}
            )
