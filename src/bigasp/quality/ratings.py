"""The ratings store: one row per judgement, in SQLite (WAL) so several raters can write at once.

A judgement is (left image id, right image id, outcome, rater, source, time); outcome is
`left`, `right` or `tie`. bigASP stored (win_path, lose_path, source) and a tie as both
orderings; `labels` turns our rows into the same averaged soft labels. Every statement is
parameterised; each call opens its own connection, so the store is safe from any thread or
process (SQLite serialises the writers; `timeout` waits for the lock).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from bigasp.errors import DataError

OUTCOMES = ("left", "right", "tie")
SCHEMA = """
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    left_id TEXT NOT NULL,
    right_id TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('left', 'right', 'tie')),
    rater TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT 'human',
    created_at TEXT NOT NULL,
    CHECK (left_id <> right_id)
);
CREATE INDEX IF NOT EXISTS ratings_pair ON ratings (left_id, right_id);
CREATE INDEX IF NOT EXISTS ratings_rater ON ratings (rater);
"""
EXPORT_SCHEMA = pa.schema(
    [
        pa.field("left_id", pa.string(), nullable=False),
        pa.field("right_id", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),
        pa.field("rater", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("created_at", pa.string(), nullable=False),
    ]
)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Rating:
    id: int
    left_id: str
    right_id: str
    outcome: str
    rater: str
    source: str
    created_at: str


class RatingStore:
    """A SQLite ratings database at `path` (created on first use)."""

    def __init__(self, path: str | Path, *, timeout: float = 30.0):
        self.path = Path(path)
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as err:
            raise DataError(f"{self.path}: cannot open the ratings database ({err})") from err
        try:
            yield con
        finally:
            con.close()

    def add(
        self, left_id: str, right_id: str, outcome: str, *, rater: str, source: str = "human",
        created_at: str | None = None,
    ) -> int:  # fmt: skip
        """Record one judgement; returns its row id (the handle for `undo`)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        if left_id == right_id:
            raise ValueError("an image cannot be rated against itself")
        with self._connect() as con:
            cur = con.execute(
                "INSERT INTO ratings (left_id, right_id, outcome, rater, source, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (left_id, right_id, outcome, rater, source, created_at or now()),
            )
            return int(cur.lastrowid)

    def add_many(self, rows: list[tuple[str, str, str, str, str, str]]) -> int:
        """Insert (left, right, outcome, rater, source, created_at) rows in one transaction."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany(
                    "INSERT INTO ratings (left_id, right_id, outcome, rater, source, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return len(rows)

    def undo(self, rating_id: int, *, rater: str) -> bool:
        """Delete one of `rater`'s own judgements; False when there is no such row."""
        with self._connect() as con:
            cur = con.execute("DELETE FROM ratings WHERE id = ? AND rater = ?", (int(rating_id), rater))
            return cur.rowcount == 1

    def all(self, sources: list[str] | None = None) -> list[Rating]:
        with self._connect() as con:
            if sources:
                marks = ",".join("?" for _ in sources)
                rows = con.execute(
                    f"SELECT * FROM ratings WHERE source IN ({marks}) ORDER BY id", tuple(sources)
                ).fetchall()
            else:
                rows = con.execute("SELECT * FROM ratings ORDER BY id").fetchall()
        return [Rating(*r) for r in rows]

    def count(self, rater: str | None = None) -> int:
        with self._connect() as con:
            if rater is None:
                return int(con.execute("SELECT COUNT(*) FROM ratings").fetchone()[0])
            return int(con.execute("SELECT COUNT(*) FROM ratings WHERE rater = ?", (rater,)).fetchone()[0])

    def rated_pairs(self) -> set[tuple[str, str]]:
        """Unordered pairs rated at least once, as (smaller id, larger id)."""
        with self._connect() as con:
            rows = con.execute("SELECT DISTINCT left_id, right_id FROM ratings").fetchall()
        return {(a, b) if a < b else (b, a) for a, b in rows}

    def rated_images(self, source: str = "human") -> set[str]:
        with self._connect() as con:
            rows = con.execute(
                "SELECT left_id FROM ratings WHERE source = ? UNION SELECT right_id FROM ratings WHERE source = ?",
                (source, source),
            ).fetchall()
        return {r[0] for r in rows}

    def export_table(self) -> pa.Table:
        rows = self.all()
        cols = {f.name: [getattr(r, f.name) for r in rows] for f in EXPORT_SCHEMA}
        return pa.table(cols, schema=EXPORT_SCHEMA)

    def import_table(self, table: pa.Table, source_name: str = "ratings file") -> int:
        """Append rows of an exported table (columns as EXPORT_SCHEMA; source defaults to human)."""
        missing = [c for c in ("left_id", "right_id", "outcome") if c not in table.column_names]
        if missing:
            raise DataError(
                f"{source_name}: missing column(s) {', '.join(missing)}; expected {EXPORT_SCHEMA.names}"
            )
        d = table.to_pydict()
        n = table.num_rows
        rows = []
        for i in range(n):
            outcome = d["outcome"][i]
            if outcome not in OUTCOMES or d["left_id"][i] == d["right_id"][i]:
                raise DataError(f"{source_name}: row {i} has outcome {outcome!r} or the same image twice")
            rows.append((
                d["left_id"][i], d["right_id"][i], outcome,
                (d.get("rater") or ["imported"] * n)[i] or "imported",
                (d.get("source") or ["human"] * n)[i] or "human",
                (d.get("created_at") or [now()] * n)[i] or now(),
            ))  # fmt: skip
        return self.add_many(rows)


@dataclass(frozen=True)
class PairLabels:
    """Averaged soft labels: `first[i]` vs `second[i]` (first < second), P(first better) = `p[i]`."""

    first: np.ndarray  # object array of ids
    second: np.ndarray
    p: np.ndarray  # float32
    votes: np.ndarray  # int

    def __len__(self) -> int:
        return len(self.p)


def labels(ratings: list[Rating]) -> PairLabels:
    """Average every judgement of an unordered pair (a tie counts 0.5 / 0.5), as bigASP did."""
    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in ratings:
        first_wins = {"left": 1.0, "right": 0.0, "tie": 0.5}[r.outcome]
        if r.left_id < r.right_id:
            acc[(r.left_id, r.right_id)].append(first_wins)
        else:
            acc[(r.right_id, r.left_id)].append(1.0 - first_wins)
    keys = sorted(acc)
    return PairLabels(
        first=np.array([k[0] for k in keys], dtype=object),
        second=np.array([k[1] for k in keys], dtype=object),
        p=np.array([np.mean(acc[k]) for k in keys], dtype=np.float32),
        votes=np.array([len(acc[k]) for k in keys], dtype=np.int64),
    )
