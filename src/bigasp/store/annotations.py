"""Annotation results: append-only Parquet part files per stage and model.

`bigasp annotate` (CLIP embeddings, tags, watermarks, captions) and `bigasp quality score`
write their results here, and the quality and report stages read them back. Results live
beside the manifest rather than in it because they are produced by many ranks over days,
must survive a kill without being redone, and (for embeddings, 13M × 1.5 KB) are too large
to rewrite with every manifest update. The format is in docs/formats.md ("Annotations").

Layout::

    DATASET/annotations/<stage>/<model_key>/<session>-r<rank>-<seq>.parquet

Every part has an `id` column (the manifest's image id) and the stage's own columns; its
Parquet schema metadata holds the provenance under the key `bigasp` (JSON). Parts are
written atomically (temp + rename), so a part is either absent or complete. When an id
appears in several parts, the first part by file name wins — the same rule as latents.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bigasp.errors import DataError
from bigasp.store.layout import atomic_write_parquet, visible, write_failed

ANNOTATIONS_DIR = "annotations"
PROVENANCE_KEY = b"bigasp"
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_key(kind: str, key: str) -> str:
    """Stage and model keys become folder names: keep them to a safe, portable alphabet."""
    if not _KEY_RE.match(key):
        raise DataError(
            f"annotation {kind} {key!r} is not a valid folder name: use letters, digits, '.', '_' and '-' "
            "(at most 128 characters, not starting with a dot)"
        )
    return key


def stage_dir(root: str | os.PathLike, stage: str, model_key: str) -> Path:
    return Path(root) / ANNOTATIONS_DIR / check_key("stage", stage) / check_key("model key", model_key)


def part_name(session: str, rank: int, seq: int) -> str:
    return f"{session}-r{rank:05d}-{seq:06d}.parquet"


def write_part(
    root: str | os.PathLike,
    stage: str,
    model_key: str,
    table: pa.Table,
    *,
    session: str,
    rank: int,
    seq: int,
    provenance: dict[str, Any],
) -> Path:
    """Atomically write one part file; returns its path. `table` must have an `id` column."""
    if "id" not in table.column_names:
        raise ValueError("annotation part tables need an 'id' column")
    meta = dict(table.schema.metadata or {})
    meta[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    path = stage_dir(root, stage, model_key) / part_name(session, rank, seq)
    try:
        atomic_write_parquet(table, path)
    except OSError as err:
        raise write_failed(
            err, path, f"the {stage} parts written before it ({seq - 1} by this run) are kept",
            "run the same command again to continue: images in parts already written are not done again",
        ) from None  # fmt: skip
    return path


def list_parts(root: str | os.PathLike, stage: str, model_key: str) -> list[Path]:
    d = stage_dir(root, stage, model_key)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix == ".parquet" and visible(p.name))


def list_models(root: str | os.PathLike, stage: str) -> list[str]:
    d = Path(root) / ANNOTATIONS_DIR / check_key("stage", stage)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and visible(p.name))


def resolve_model(root: str | os.PathLike, stage: str, model_key: str | None) -> str:
    """The model key to read: the given one, or the only one present; else a clear error."""
    models = list_models(root, stage)
    if model_key is not None:
        if check_key("model key", model_key) not in models:
            have = ", ".join(models) or "none"
            raise DataError(
                f"{root}: no '{stage}' annotations from model {model_key!r} (present: {have}); "
                f"run `bigasp annotate {root} --stage {stage}` first"
            )
        return model_key
    if not models:
        raise DataError(f"{root}: no '{stage}' annotations yet; run `bigasp annotate {root} --stage {stage}`")
    if len(models) > 1:
        raise DataError(
            f"{root}: '{stage}' annotations from several models ({', '.join(models)}); name one with --model-key"
        )
    return models[0]


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def read_stage(root: str | os.PathLike, stage: str, model_key: str | None = None) -> pa.Table:
    """All parts of one stage and model, one row per id (first part by name wins), sorted by id."""
    key = resolve_model(root, stage, model_key)
    tables = []
    for path in list_parts(root, stage, key):
        try:
            tables.append(pq.read_table(path))
        except Exception as err:  # a damaged part: name it, the fix is to delete it and resume
            raise DataError(
                f"{path}: unreadable annotation part ({err}); delete it and re-run annotate"
            ) from err
    if not tables:
        raise DataError(f"{root}: '{stage}' annotations from {key!r} have no part files")
    table = pa.concat_tables(tables, promote_options="default")
    ids = table.column("id").to_numpy(zero_copy_only=False)
    _, first = np.unique(ids, return_index=True)  # np.unique sorts: rows come back sorted by id
    return table.take(pa.array(first)).replace_schema_metadata(None)


@dataclass(frozen=True)
class Embeddings:
    """Image embeddings of one model: `ids[i]` has vector `vectors[i]` (float16, sorted by id)."""

    model_key: str
    ids: np.ndarray  # object array of str
    vectors: np.ndarray  # float16 [N, D]

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, ids: list[str] | np.ndarray) -> np.ndarray:
        """Vectors for the given ids, in their order; a missing id is a DataError naming it."""
        ids = np.asarray(ids, dtype=object)
        pos = np.searchsorted(self.ids, ids)
        pos = np.clip(pos, 0, len(self.ids) - 1)
        missing = self.ids[pos] != ids if len(self.ids) else np.ones(len(ids), bool)
        if np.any(missing):
            raise DataError(
                f"{int(np.sum(missing))} image(s) have no '{self.model_key}' embedding "
                f"(first: {ids[np.argmax(missing)]}); run `bigasp annotate --stage embed` on the dataset"
            )
        return self.vectors[pos]


def embeddings_table(ids: list[str], vectors: np.ndarray) -> pa.Table:
    """The part table for the `embed` stage: `id` and `embedding` (fixed-size list of float16)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    if vectors.ndim != 2 or len(ids) != vectors.shape[0]:
        raise ValueError(f"need one [D] vector per id, got {vectors.shape} for {len(ids)} ids")
    flat = pa.array(vectors.reshape(-1))
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
        }
    )


def read_embeddings(root: str | os.PathLike, model_key: str | None = None) -> Embeddings:
    """Every embedding of one model in the dataset (see `read_stage` for the duplicate rule)."""
    key = resolve_model(root, "embed", model_key)
    table = read_stage(root, "embed", key)
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    vectors = col.values.to_numpy(zero_copy_only=False).astype(np.float16, copy=False).reshape(-1, dim)
    ids = table.column("id").to_numpy(zero_copy_only=False).astype(object)
    return Embeddings(model_key=key, ids=ids, vectors=vectors)


FAILED_DIR = "failed"
FAILURES_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
    ]
)


def write_failures(
    root: str | os.PathLike,
    stage: str,
    model_key: str,
    rows: list[dict[str, str]],
    *,
    session: str,
    rank: int,
    seq: int,
) -> Path:
    """Images a stage could not annotate (id, reason, detail), beside its parts in `failed/`."""
    path = stage_dir(root, stage, model_key) / FAILED_DIR / part_name(session, rank, seq)
    try:
        atomic_write_parquet(pa.Table.from_pylist(rows, schema=FAILURES_SCHEMA), path)
    except OSError as err:
        raise write_failed(
            err, path, f"the {stage} parts written before it are kept",
            "run the same command again to continue: images in parts already written are not done again",
        ) from None  # fmt: skip
    return path


def read_failures(root: str | os.PathLike, stage: str, model_key: str) -> pa.Table:
    d = stage_dir(root, stage, model_key) / FAILED_DIR
    paths = sorted(p for p in d.glob("*.parquet") if visible(p.name)) if d.is_dir() else []
    if not paths:
        return FAILURES_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(p, schema=FAILURES_SCHEMA) for p in paths)


def done_ids(root: str | os.PathLike, stage: str, model_key: str, *, with_failures: bool = True) -> set[str]:
    """Ids a resumed run skips: those in any part (and, unless retrying, those recorded as failed)."""
    ids: set[str] = set()
    for path in list_parts(root, stage, model_key):
        ids.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    if with_failures:
        ids.update(read_failures(root, stage, model_key).column("id").to_pylist())
    return ids


def coverage(root: str | os.PathLike, image_ids: set[str]) -> dict[str, dict[str, int]]:
    """Per `stage/model`: images annotated and images recorded as failed (manifest ids only)."""
    base = Path(root) / ANNOTATIONS_DIR
    out: dict[str, dict[str, int]] = {}
    if not base.is_dir():
        return out
    for stage in sorted(p.name for p in base.iterdir() if p.is_dir() and visible(p.name)):
        for model in list_models(root, stage):
            done = done_ids(root, stage, model, with_failures=False) & image_ids
            failed = set(read_failures(root, stage, model).column("id").to_pylist()) & image_ids
            out[f"{stage}/{model}"] = {"done": len(done), "failed": len(failed - done)}
    return out
