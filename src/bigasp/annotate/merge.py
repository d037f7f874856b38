"""`bigasp annotate merge`: bring annotation results into the manifest's training columns.

Columns and their sources:

- `tags`      <- the tags stage (`tags` list)
- `captions`  <- the caption stage (one caption -> a one-element list)
- `score`     <- the quality stage (`score`, 0..9)
- `watermark` <- the watermark stage (`watermark` flag)

Precedence: with `precedence = "sidecar"` (default) a value that came from the user's
sidecar files wins and annotations only fill what is empty (null, or an empty list); with
`"annotations"` an annotation replaces the sidecar value and images without one keep theirs.
The sidecar values are snapshotted to `annotations/sidecar-values.parquet` the first time
an image is merged, so merging again (with new results or the other precedence) always
starts from what the sidecars said, never from an earlier merge. The provenance of every
stage used is recorded in dataset.json under "annotations".
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from bigasp import __version__
from bigasp.annotate.config import MergeConfig
from bigasp.errors import DataError
from bigasp.store import annotations as store
from bigasp.store import layout, remote, workcopy
from bigasp.store.manifest import (
    MANIFEST_SCHEMA,
    conform,
    init_dataset,
    manifest_lock,
    read_dataset_json,
    read_manifest,
)

log = logging.getLogger(__name__)

SNAPSHOT = "sidecar-values.parquet"
SOURCES = {  # manifest column -> (stage, result column)
    "tags": ("tags", "tags"),
    "captions": ("caption", "caption"),
    "score": ("quality", "score"),
    "watermark": ("watermark", "watermark"),
}
MERGED = ("tags", "captions", "score", "watermark")
MERGE_TABLES = (layout.DATASET_JSON, layout.MANIFEST)  # what merge rewrites; the manifest last


def _empty(col: pa.ChunkedArray) -> pa.Array:
    """True where a value counts as absent: null, or an empty list."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_list(col.type):
        return pc.or_kleene(pc.is_null(col), pc.equal(pc.list_value_length(col), 0)).fill_null(True)
    return pc.is_null(col)


def _sidecars(root: Path, manifest: pa.Table, *, fresh: bool = False) -> pa.Table:
    """Sidecar values of every manifest image: the snapshot, plus current values for new images.

    `fresh=True` says the manifest was just rebuilt from the sidecars by ingest: its values
    replace the snapshot (so edited sidecars are seen), instead of only extending it.
    """
    path = root / store.ANNOTATIONS_DIR / SNAPSHOT
    cols = ["id", *MERGED]
    current = manifest.select(cols)
    if fresh or not path.exists():
        snap = current
    else:
        import pyarrow.parquet as pq

        old = pq.read_table(path).select(cols).cast(current.schema)
        new = current.filter(pc.invert(pc.is_in(current.column("id"), value_set=old.column("id"))))
        snap = pa.concat_tables([old, new])
    layout.atomic_write_parquet(snap, path)
    return snap


def _annotation_column(
    root: Path, stage: str, column: str, model: str | None, ids: pa.Array, target: pa.DataType
):
    """The stage's values aligned to `ids` (null where an image has none), and its provenance."""
    if not store.list_models(root, stage):
        return None, None
    key = store.resolve_model(root, stage, model)
    table = store.read_stage(root, stage, key)
    if column not in table.column_names:
        raise DataError(f"{root}: '{stage}' results from {key!r} have no '{column}' column")
    pos = pc.index_in(ids, value_set=table.column("id"))
    values = table.column(column).combine_chunks().take(pos)
    if column == "caption":
        values = pa.array([[v] if v is not None else None for v in values.to_pylist()], pa.list_(pa.string()))
    prov = store.read_provenance(store.list_parts(root, stage, key)[0])
    return values.cast(target), {**prov, "model_key": key}


def _merged(
    root: Path, manifest: pa.Table, sidecar: pa.Table, columns: dict[str, dict[str, Any]]
) -> tuple[pa.Table, dict[str, Any], dict[str, Any]]:
    """The manifest with each column in `columns` ({col: {precedence, model}}) merged."""
    sidecar = sidecar.take(pc.index_in(manifest.column("id"), value_set=sidecar.column("id")))
    ids = manifest.column("id").combine_chunks()
    out = manifest
    counts: dict[str, Any] = {}
    provenance: dict[str, Any] = {}
    for col, how in columns.items():
        stage, src = SOURCES[col]
        target = MANIFEST_SCHEMA.field(col).type
        ann, prov = _annotation_column(root, stage, src, how.get("model"), ids, target)
        side = sidecar.column(col).combine_chunks().cast(target)
        if ann is None:
            merged, from_ann = side, 0
        else:
            use_ann = (
                pc.and_(_empty(side), pc.invert(_empty(ann)))
                if how["precedence"] == "sidecar"
                else pc.invert(_empty(ann))
            )
            merged = pc.if_else(use_ann, ann, side)
            from_ann = int(pc.sum(use_ann).as_py() or 0)
            provenance[stage] = prov
        out = out.set_column(out.schema.get_field_index(col), col, merged)
        counts[col] = {
            "from_annotations": from_ann,
            "from_sidecars": int(pc.sum(pc.invert(_empty(merged))).as_py() or 0) - from_ann,
            "empty": int(pc.sum(_empty(merged)).as_py() or 0),
        }
    return conform(out, MANIFEST_SCHEMA), counts, provenance


def merge(dataset: str, cfg: MergeConfig) -> dict[str, Any]:
    """Rewrite the manifest's annotation columns; returns per-column counts and the provenance used.

    The choice made for each column (precedence, model) is recorded in dataset.json, and
    `bigasp ingest` re-applies it whenever it rebuilds the manifest from the sidecars, so a
    later ingest never silently drops merged annotations.
    """
    if remote.is_url(dataset):  # merged in this machine's working copy, then written back
        url = dataset.rstrip("/")
        local = workcopy.work_dir(url, cfg.work_dir)
        stages = [SOURCES[col][0] for col in cfg.columns]  # only what the merged columns read
        workcopy.pull(url, local, cfg.storage_options, annotations=stages)
        report = merge(str(local), cfg)
        workcopy.push(url, local, cfg.storage_options, tables=MERGE_TABLES, annotations=True)
        return report
    root = Path(dataset)
    fs, rootp = layout.url_to_fs(str(root))
    read_dataset_json(fs, rootp)
    with manifest_lock(root, wait_s=60.0, holder="a running `bigasp ingest` or merge"):
        manifest = read_manifest(fs, rootp)
        if len(manifest) == 0:
            raise DataError(
                f"{root}/{layout.MANIFEST} is missing or has no images; run `bigasp ingest` first"
            )
        meta = json.loads((root / layout.DATASET_JSON).read_text())
        recorded = dict((meta.get("annotations") or {}).get("columns") or {})
        columns = {
            col: {"precedence": cfg.precedence, "model": cfg.models.get(SOURCES[col][0])}
            for col in cfg.columns
        }
        sidecar = _sidecars(root, manifest)
        out, counts, provenance = _merged(root, manifest, sidecar, columns)
        layout.atomic_write_parquet(out, root / layout.MANIFEST)
        stages = dict((meta.get("annotations") or {}).get("stages") or {})
        _record(root, {**recorded, **columns}, {**stages, **provenance}, cfg.precedence)
    return {"precedence": cfg.precedence, "columns": counts, "provenance": provenance}


def _record(root: Path, columns: dict[str, Any], stages: dict[str, Any], precedence: str) -> None:
    init_dataset(
        root,
        {
            "annotations": {
                "merged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "precedence": precedence,
                "columns": columns,
                "bigasp_version": __version__,
                "stages": stages,
            }
        },
    )


def reapply(root: Path, manifest: pa.Table) -> pa.Table:
    """Merge again, as recorded, into a manifest that ingest just rebuilt from the sidecars.

    Called by ingest under its manifest lock. A dataset that was never merged is returned
    unchanged. A column whose results are gone or ambiguous keeps its sidecar values (warning).
    """
    meta = json.loads((root / layout.DATASET_JSON).read_text())
    columns = (meta.get("annotations") or {}).get("columns") or {}
    if not columns or len(manifest) == 0:
        return manifest
    gen = manifest.schema.metadata
    sidecar = _sidecars(root, manifest, fresh=True)
    usable = {}
    for col, how in columns.items():
        stage = SOURCES[col][0]
        if not store.list_models(root, stage):
            continue
        try:
            store.resolve_model(root, stage, how.get("model"))
        except DataError as err:  # results deleted or ambiguous: never fail an ingest over it
            log.warning("%s keeps its sidecar values: %s", col, err)
            continue
        usable[col] = how
    out, _, _ = _merged(root, manifest, sidecar, usable)
    return out.replace_schema_metadata(gen)
