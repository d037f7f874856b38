"""Annotation part files: atomic parts, first-part-wins dedup, embeddings round trip, clear errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from bigasp.errors import DataError
from bigasp.store.annotations import (
    embeddings_table,
    list_parts,
    read_embeddings,
    read_provenance,
    read_stage,
    write_part,
)


def test_embeddings_round_trip_sorted_and_first_part_wins(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 768)).astype(np.float16)
    b = rng.standard_normal((2, 768)).astype(np.float16)
    prov = {"model": "clip-tiny", "sha256": "ab"}
    write_part(
        tmp_path,
        "embed",
        "clip",
        embeddings_table(["c", "a", "b"], a),
        session="s1",
        rank=0,
        seq=0,
        provenance=prov,
    )
    # a later part repeats id "a" with another vector: the first part by name keeps it
    write_part(
        tmp_path,
        "embed",
        "clip",
        embeddings_table(["a", "d"], b),
        session="s1",
        rank=1,
        seq=0,
        provenance=prov,
    )
    emb = read_embeddings(tmp_path)
    assert emb.model_key == "clip"
    assert list(emb.ids) == ["a", "b", "c", "d"]
    assert emb.vectors.dtype == np.float16 and emb.vectors.shape == (4, 768)
    np.testing.assert_array_equal(emb.vectors[0], a[1])
    np.testing.assert_array_equal(emb.vectors[3], b[1])
    np.testing.assert_array_equal(emb.lookup(["d", "c"]), np.stack([b[1], a[0]]))
    with pytest.raises(DataError, match=r"no .clip. embedding.*zz"):
        emb.lookup(["a", "zz"])
    parts = list_parts(tmp_path, "embed", "clip")
    assert len(parts) == 2 and read_provenance(parts[0]) == prov


def test_hidden_temp_parts_are_ignored_and_stage_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="bigasp annotate"):
        read_stage(tmp_path, "tags")
    write_part(
        tmp_path,
        "tags",
        "joytag",
        pa.table({"id": ["x"], "n": [1]}),
        session="s",
        rank=0,
        seq=0,
        provenance={},
    )
    (tmp_path / "annotations/tags/joytag/.tmp-partial.parquet").write_bytes(b"garbage")
    assert read_stage(tmp_path, "tags").column("n").to_pylist() == [1]
    write_part(
        tmp_path, "tags", "wd", pa.table({"id": ["x"], "n": [2]}), session="s", rank=0, seq=0, provenance={}
    )
    with pytest.raises(DataError, match="several models"):
        read_stage(tmp_path, "tags")
    assert read_stage(tmp_path, "tags", "wd").column("n").to_pylist() == [2]
    with pytest.raises(DataError, match="not a valid folder name"):
        read_stage(tmp_path, "tags", "../etc")


def test_damaged_part_is_named(tmp_path):
    path = write_part(
        tmp_path,
        "embed",
        "clip",
        embeddings_table(["a"], np.zeros((1, 4))),
        session="s",
        rank=0,
        seq=0,
        provenance={},
    )
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=path.name):
        read_embeddings(tmp_path)
