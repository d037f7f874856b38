"""Writing scores as `quality` annotation parts (the manifest is filled by `bigasp annotate merge`)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bigasp.store import annotations

STAGE = "quality"


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
