"""Writing scores: `quality` annotation parts, and (optionally) the manifest's `score` column.

`update_manifest_column` is deliberately general (any manifest column, any stage) so that a
merge of other annotation stages can reuse it: it takes the ingest lock, rewrites the
manifest atomically with the new values for the given ids (other rows untouched), and
records the provenance of the column in dataset.json under `provenance.<column>`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bigasp.errors import DataError
from bigasp.store import annotations, layout
from bigasp.store.manifest import MANIFEST_SCHEMA, init_dataset, read_dataset_json, read_manifest

STAGE = "quality"
LOCK = ".ingest.lock"  # the lock `bigasp ingest` holds while it rewrites the manifest


@contextlib.contextmanager
def manifest_lock(root: Path, wait_s: float = 60.0) -> Iterator[None]:
    """Exclusive lock against ingest (and other writers) while the manifest is rewritten."""
    f = open(root / LOCK, "w")  # noqa: SIM115 - held for the whole update
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DataError(
                        f"{root} is locked by a running `bigasp ingest`; retry when it ends"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        f.close()


def update_manifest_column(
    root: str | os.PathLike, column: str, ids: list[str] | np.ndarray, values: pa.Array | list,
    provenance: dict[str, Any],
) -> int:  # fmt: skip
    """Set `column` for the given ids in DATASET/manifest.parquet; returns rows changed."""
    root = Path(root)
    if column not in MANIFEST_SCHEMA.names or column in ("id", "path"):
        raise ValueError(f"{column!r} is not an annotation column of the manifest")
    fs, path = layout.url_to_fs(root)
    with manifest_lock(root):
        read_dataset_json(fs, path)  # a clear error when root is not a dataset
        table = read_manifest(fs, path)
        if table.num_rows == 0:
            raise DataError(f"{root}/{layout.MANIFEST} has no images; run `bigasp ingest` first")
        typ = MANIFEST_SCHEMA.field(column).type
        new_vals = pa.array(values, typ) if not isinstance(values, pa.Array) else values.cast(typ)
        pos = pc.index_in(table.column("id"), value_set=pa.array(list(ids), pa.string()))
        hit = pc.is_valid(pos)
        gathered = new_vals.take(pc.fill_null(pos, 0)) if len(new_vals) else pa.nulls(table.num_rows, typ)
        merged = pc.if_else(hit, gathered, table.column(column))
        table = table.set_column(
            MANIFEST_SCHEMA.get_field_index(column), MANIFEST_SCHEMA.field(column), merged
        )
        layout.atomic_write_parquet(table, root / layout.MANIFEST)
        meta = json.loads((root / layout.DATASET_JSON).read_text())
        prov = dict(meta.get("provenance") or {})
        prov[column] = provenance
        init_dataset(root, {"provenance": prov})
        return int(pc.sum(hit.cast(pa.int64())).as_py() or 0)


def quality_table(ids: list[str], scores: np.ndarray, probs: np.ndarray) -> pa.Table:
    """The `quality` part table: id, score (int8 0..bins-1), probs (fixed-size list of float16)."""
    probs = np.ascontiguousarray(probs, np.float16)
    return pa.table(
        {
            "id": pa.array(list(ids), pa.string()),
            "score": pa.array(np.asarray(scores, np.int8), pa.int8()),
            "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), probs.shape[1]),
        }
    )


def scored_ids(root: str | os.PathLike, model_key: str) -> set[str]:
    """Ids already scored by this model (a re-run only scores new embeddings)."""
    import pyarrow.parquet as pq

    out: set[str] = set()
    for p in annotations.list_parts(root, STAGE, model_key):
        out.update(pq.read_table(p, columns=["id"]).column("id").to_pylist())
    return out


def write_scores(
    root: str | os.PathLike, model_key: str, ids: list[str], scores: np.ndarray, probs: np.ndarray,
    provenance: dict[str, Any], *, part_rows: int = 100_000,
) -> list[Path]:  # fmt: skip
    session = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    paths = []
    for seq, s in enumerate(range(0, len(ids), part_rows)):
        t = quality_table(ids[s : s + part_rows], scores[s : s + part_rows], probs[s : s + part_rows])
        paths.append(annotations.write_part(root, STAGE, model_key, t, session=session, rank=0, seq=seq,
                                            provenance=provenance))  # fmt: skip
    return paths


def read_scores(root: str | os.PathLike, model_key: str | None = None) -> tuple[list[str], np.ndarray]:
    t = annotations.read_stage(root, STAGE, model_key)
    return t.column("id").to_pylist(), t.column("score").to_numpy().astype(np.int8)
