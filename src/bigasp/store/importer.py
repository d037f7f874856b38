"""Import an existing bigASP dataset (per-image `.bin.gz` latents + its Parquet index).

bigASP's `build-dataset.py` wrote a Parquet file with `image_hash` (md5 of the source path),
`tag_string`, `caption`, `score`, ...; its encoder wrote `vaes/h[:2]/h[2:4]/h.bin.gz`. This
turns both into a bigasp dataset directory (manifest + shards), so a bigASP user keeps the
latents they already paid for. Ids stay bigASP's path hashes (the original bytes are not
available to hash); everything else follows docs/formats.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bigasp.errors import DataError
from bigasp.store import layout
from bigasp.store.legacy import read_bigasp_latent
from bigasp.store.manifest import MANIFEST_SCHEMA, REJECTS_SCHEMA, init_dataset
from bigasp.store.shard import RecordMeta, ShardWriter


def _latent_path(vaes: Path, h: str) -> Path:
    return vaes / h[:2] / h[2:4] / f"{h}.bin.gz"


def import_bigasp(
    vaes: str | os.PathLike,
    out: str | os.PathLike,
    *,
    index: str | os.PathLike | None = None,
    compression: str = "none",
    shard_size: int = 2048,
) -> dict[str, Any]:
    """Convert bigASP latents (and, if given, its Parquet index) into dataset `out`."""
    vaes, final = Path(vaes), Path(out)
    if not vaes.is_dir():
        raise DataError(f"{vaes} is not a folder; pass bigASP's vaes/ directory (vaes/ab/cd/<md5>.bin.gz)")
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise DataError(f"{final} already exists and is not empty; import into a new directory")
    # Built in a hidden sibling and renamed into place at the end: an error or a kill midway never
    # leaves shards without a manifest under `out`.
    final.parent.mkdir(parents=True, exist_ok=True)
    root = final.parent / f".tmp-import-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        counts = _import(vaes, root, index, compression, shard_size)
        if final.exists():
            final.rmdir()
        os.replace(root, final)
        layout.fsync_dir(final.parent)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return counts


def _score(value: Any) -> int | None:
    """bigASP's 0..9 quality score; anything else raises ValueError (the row is rejected)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"score must be an integer 0..9, got {value!r}")
    if value != int(value) or not 0 <= value <= 9:
        raise ValueError(f"score must be an integer 0..9, got {value!r}")
    return int(value)


def _import(vaes: Path, root: Path, index, compression: str, shard_size: int) -> dict[str, Any]:
    if index is not None:
        table = pq.read_table(index)
        if "image_hash" not in table.column_names:
            raise DataError(f"{index} has no image_hash column; is it bigASP's build-dataset.py output?")
        rows = table.to_pylist()
    else:
        rows = [{"image_hash": p.name[: -len(".bin.gz")]} for p in sorted(vaes.glob("*/*/*.bin.gz"))]
    init_dataset(root)
    session = uuid.uuid4().hex[:8]
    writers: dict[tuple[int, int], ShardWriter] = {}
    seq = 0
    manifest, rejects = [], []
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    try:
        for row in rows:
            h = str(row["image_hash"])
            path = _latent_path(vaes, h)
            if h in seen:
                continue
            seen.add(h)
            try:
                item = read_bigasp_latent(path)
            except (DataError, OSError) as err:
                reason = "unreadable" if not path.exists() else "corrupt"
                rejects.append(
                    {"path": str(path), "reason": reason, "detail": str(err), "id": h, "stage": "ingest"}
                )
                counts[reason] += 1
                continue
            problem = None
            if not np.isfinite(item.latent).all():
                problem = ("non_finite", "latent holds inf/nan; re-encode this image")
            else:
                try:
                    score = _score(row.get("score"))
                except ValueError as err:
                    problem = ("bad_score", str(err))
            if problem is not None:
                rejects.append(
                    {
                        "path": str(path),
                        "reason": problem[0],
                        "detail": problem[1],
                        "id": h,
                        "stage": "ingest",
                    }
                )
                counts[problem[0]] += 1
                continue
            key = (item.bucket_height, item.bucket_width)
            w = writers.get(key)
            if w is None:
                seq += 1
                w = writers[key] = ShardWriter(
                    root,
                    f"{session}-bigasp-{seq:06d}",
                    *key,
                    compression=compression,
                    header={"vae": "bigasp-import"},
                )
            w.add(
                item.latent,
                RecordMeta(h, item.original_height, item.original_width, item.crop_top, item.crop_left),
            )
            if len(w) >= shard_size:
                w.close()
                del writers[key]
            tags = [t.strip() for t in str(row.get("tag_string") or "").split(",") if t.strip()]
            caption = row.get("caption")
            extra = {
                k: v for k, v in row.items() if k not in ("image_hash", "tag_string", "caption", "score")
            }
            manifest.append(
                {
                    "id": h,
                    "path": str(path),
                    "file_size": path.stat().st_size,
                    "mtime": path.stat().st_mtime,
                    "format": "bigasp-latent",
                    "width": item.original_width,
                    "height": item.original_height,
                    "orientation": 1,
                    "captions": [caption] if caption else [],
                    "tags": tags,
                    "score": score,
                    "extra": json.dumps(extra, sort_keys=True, default=str),
                }
            )
            counts["imported"] += 1
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    table = pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA).sort_by("id")
    layout.atomic_write_parquet(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), root / layout.REJECTS)
    layout.atomic_write_parquet(table, root / layout.MANIFEST)
    return dict(counts)
