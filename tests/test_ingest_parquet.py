"""Parquet sources: one image per row (Hugging Face's {bytes, path} struct or a plain binary
column), other columns read as the row's JSON sidecar, re-reading rows for encode/annotate,
incremental re-runs, and bad files / cells as rejects naming the file and column."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bigasp.annotate.decode import manifest_jobs
from bigasp.errors import DataError
from bigasp.prep.images import Reject
from bigasp.prep.ingest import content_id, ingest, read_ingested
from bigasp.prep.sources import manifest_ref
from bigasp.store import layout
from bigasp.store.manifest import read_manifest
from test_ingest import cfg, jpeg_bytes

# Hugging Face `datasets` stores an `Image` feature as this struct (datasets.features.Image.pa_type).
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
IMAGES = [jpeg_bytes(64 + 8 * i, 64, seed=10 + i) for i in range(5)]


def hf_table(images=IMAGES) -> pa.Table:
    return pa.table(
        {
            "image": pa.array([{"bytes": b, "path": f"img{i}.jpg"} for i, b in enumerate(images)], HF_IMAGE),
            "text": [f"caption {i}" for i in range(len(images))],
            "tags": [["a", f"t{i}"] for i in range(len(images))],
            "aesthetic": [0.5 * i for i in range(len(images))],
        }
    )


def manifest(ds: Path) -> dict[str, list]:
    return pq.read_table(ds / layout.MANIFEST).sort_by("row").to_pydict()


def rejects(ds: Path) -> dict[str, dict]:
    t = pq.read_table(ds / layout.REJECTS).to_pylist()
    return {r["path"]: r for r in t}


def test_hf_parquet_rows_are_images_with_their_columns(tmp_path):
    f = tmp_path / "photos.parquet"
    pq.write_table(hf_table(), f, row_group_size=2)  # 3 row groups: rows are found across groups
    ds = tmp_path / "ds"
    s = ingest([f], ds, cfg(allow_upscale=True, parquet_columns={"text": "caption"}))
    assert (s.new, sum(s.rejects.values())) == (5, 0)
    m = manifest(ds)
    assert m["row"] == [0, 1, 2, 3, 4]
    assert m["path"] == [f"{f}::image[{i}]" for i in range(5)]
    assert m["id"] == [content_id(b) for b in IMAGES]
    assert m["file_size"] == [len(b) for b in IMAGES]
    assert m["width"] == [64 + 8 * i for i in range(5)] and m["height"] == [64] * 5
    assert m["captions"] == [[f"caption {i}"] for i in range(5)]
    assert m["tags"] == [["a", f"t{i}"] for i in range(5)]
    assert [json.loads(e)["aesthetic"] for e in m["extra"]] == [0.5 * i for i in range(5)]
    # every later stage rebuilds the reference from the manifest and gets the same bytes, checked
    for i in reversed(range(5)):  # out of order: another row group each time
        ref = manifest_ref(m["path"][i], m["tar_offset"][i], m["file_size"][i], m["row"][i])
        assert read_ingested(ref, m["id"][i]) == IMAGES[i]
    jobs = manifest_jobs(read_manifest(*layout.url_to_fs(str(ds))))
    assert {j.id: j.ref.read() for j in jobs} == {content_id(b): b for b in IMAGES}
    # a replaced file: the row's bytes no longer match the manifest id
    pq.write_table(hf_table(IMAGES[::-1]), f)
    ref = manifest_ref(m["path"][0], None, m["file_size"][0], 0)
    with pytest.raises(Reject) as err:
        read_ingested(ref, m["id"][0])
    assert err.value.reason == "changed_since_ingest"


def test_binary_column_bad_cells_and_failed_downloads(tmp_path):
    """img2dataset's parquet output: a `jpg` binary column, key/status/error_message columns."""
    f = tmp_path / "shard.parquet"
    good = IMAGES[0]
    pq.write_table(
        pa.table(
            {
                "key": ["0", "1", "2", "3"],
                "jpg": pa.array([good, None, b"not an image", None], pa.binary()),
                "caption": ["ok", None, "junk", None],
                "status": ["success", "success", "success", "failed_to_download"],
                "error_message": [None, None, None, "HTTP 404"],
            }
        ),
        f,
    )
    ds = tmp_path / "ds"
    s = ingest([f], ds, cfg(allow_upscale=True))
    assert s.new == 1
    r = rejects(ds)
    assert r[f"{f}::jpg[1]"]["reason"] == "missing_image"
    assert "row 1" in r[f"{f}::jpg[1]"]["detail"] and "'jpg'" in r[f"{f}::jpg[1]"]["detail"]
    assert r[f"{f}::jpg[2]"]["reason"] == "unsupported_format"
    assert (
        "row 2, column 'jpg'" in r[f"{f}::jpg[2]"]["detail"]
        and "--image-column" in r[f"{f}::jpg[2]"]["detail"]
    )
    assert r[f"{f}::jpg[3]"]["reason"] == "download_failed"
    assert "failed_to_download" in r[f"{f}::jpg[3]"]["detail"] and "HTTP 404" in r[f"{f}::jpg[3]"]["detail"]
    assert manifest(ds)["captions"] == [["ok"]]


def test_bad_parquet_files_are_rejects_naming_file_and_fix(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(hf_table(IMAGES[:2]), src / "good.parquet")
    whole = (src / "good.parquet").read_bytes()
    (src / "cut.parquet").write_bytes(whole[: len(whole) // 2])  # truncated: no footer
    pq.write_table(pa.table({"url": ["http://x"], "caption": ["c"]}), src / "nocol.parquet")
    # img2dataset's per-shard metadata table (no image; the images are in 00000.tar): skipped
    pq.write_table(
        pa.table({"url": ["u"], "key": ["000000000"], "status": ["failed_to_download"]}),
        src / "00000.parquet",
    )
    pq.write_table(
        pa.table({"a": pa.array([IMAGES[0]], pa.binary()), "b": pa.array([IMAGES[1]], pa.binary())}),
        src / "two.parquet",
    )
    # a Hugging Face dataset whose images are only paths (bytes null): not readable as rows
    pq.write_table(
        pa.table({"image": pa.array([{"bytes": None, "path": "x.jpg"}], HF_IMAGE)}), src / "paths.parquet"
    )
    ds = tmp_path / "ds"
    s = ingest([src], ds, cfg(allow_upscale=True))
    assert s.new == 2
    r = rejects(ds)
    only_path = r.pop(f"{src}/paths.parquet::image[0]")
    assert only_path["reason"] == "missing_image" and "only a path 'x.jpg'" in only_path["detail"]
    assert set(r) == {f"{src}/cut.parquet::", f"{src}/nocol.parquet::", f"{src}/two.parquet::"}
    assert {x["reason"] for x in r.values()} == {"bad_parquet"}
    assert "not a readable Parquet file" in r[f"{src}/cut.parquet::"]["detail"]
    assert "no image column" in r[f"{src}/nocol.parquet::"]["detail"]
    assert (
        "--image-column" in r[f"{src}/two.parquet::"]["detail"]
        and "a, b" in r[f"{src}/two.parquet::"]["detail"]
    )
    # naming the column fixes the ambiguous file on a plain re-run; a wrong name says which columns exist
    s = ingest([src / "two.parquet"], ds, cfg(allow_upscale=True, parquet_image_column="b"))
    assert (s.duplicates, s.removed) == (1, 1)  # the file's reject is gone, its row is a copy of good's row 1
    assert [f"{src}/good.parquet::image[1]", f"{src}/two.parquet::b[0]"] in manifest(ds)["paths"]
    assert f"{src}/two.parquet::" not in rejects(ds)
    ingest([src / "good.parquet"], ds, cfg(allow_upscale=True, parquet_image_column="pixels"))
    detail = rejects(ds)[f"{src}/good.parquet::"]["detail"]
    assert (
        "no column 'pixels'" in detail
        and "image, text, tags, aesthetic" in detail
        and "--image-column" in detail
    )


def test_incremental_follows_the_parquet_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    f = src / "photos.parquet"
    pq.write_table(hf_table(IMAGES[:3]), f)
    ds = tmp_path / "ds"
    c = cfg(allow_upscale=True)
    assert ingest([f], ds, c).new == 3
    again = ingest([f], ds, c)
    assert (again.skipped, again.new, again.updated) == (3, 0, 0)  # unchanged file: nothing read
    # a renamed column re-reads the rows (their sidecar changed), without any new image
    renamed = ingest([f], ds, cfg(allow_upscale=True, parquet_columns={"text": "caption"}))
    assert renamed.updated == 3 and manifest(ds)["captions"][0] == ["caption 0"]
    # rewritten with 2 rows, the first replaced: row 2 is pruned, row 0 gets the new image's id
    pq.write_table(hf_table([IMAGES[4], IMAGES[1]]), f)
    s = ingest([f], ds, c)
    assert (s.updated, s.removed) == (2, 1)
    assert manifest(ds)["id"] == [content_id(IMAGES[4]), content_id(IMAGES[1])]
    # the file removed from its folder: its rows leave the dataset
    f.unlink()
    s = ingest([src], ds, c)
    assert s.removed == 2 and pq.read_metadata(ds / layout.MANIFEST).num_rows == 0


def test_encode_reads_parquet_rows_like_files(tmp_path):
    """The same photos as Parquet rows and as files encode to the same latents (crc of each record)."""
    from bigasp.prep.config import EncodeConfig
    from bigasp.prep.encode import encode
    from bigasp.store.manifest import read_index

    f = tmp_path / "photos.parquet"
    pq.write_table(hf_table(), f, row_group_size=2)
    files = tmp_path / "files"
    files.mkdir()
    for i, b in enumerate(IMAGES):
        (files / f"{i}.jpg").write_bytes(b)
    ecfg = EncodeConfig(vae="tiny", num_workers=0, batch_size=2, progress=False)
    crcs = []
    for name, src in (("rows", f), ("files", files)):
        ds = tmp_path / f"ds-{name}"
        ingest([src], ds, cfg(allow_upscale=True, workers=2 if name == "rows" else 1))
        assert encode(ds, ecfg).encoded == 5
        index = read_index(*layout.url_to_fs(str(ds)))
        crcs.append(dict(zip(index.column("id").to_pylist(), index.column("crc32").to_pylist(), strict=True)))
    assert crcs[0] == crcs[1] and set(crcs[0]) == {content_id(b) for b in IMAGES}


def test_glob_sources_expand_and_prune_like_a_folder(tmp_path):
    src = tmp_path / "src"
    (src / "more").mkdir(parents=True)
    for i, name in enumerate(["a.parquet", "b.parquet", "more/c.parquet"]):
        pq.write_table(hf_table(IMAGES[i : i + 1]), src / name)
    (src / "photo.jpg").write_bytes(IMAGES[3])
    ds = tmp_path / "ds"
    c = cfg(allow_upscale=True)
    assert ingest([str(src / "*.parquet")], ds, c).new == 2  # not more/c.parquet, not photo.jpg
    assert ingest([str(src / "**" / "*.parquet")], ds, c).new == 1
    (src / "b.parquet").unlink()
    s = ingest([str(src / "*.parquet")], ds, c)  # b no longer matches: pruned; more/c is outside `*`
    assert s.removed == 1
    assert sorted(manifest(ds)["path"]) == [f"{src}/a.parquet::image[0]", f"{src}/more/c.parquet::image[0]"]
    with pytest.raises(DataError, match="matches no file"):
        ingest([str(src / "*.tar")], ds, c)


@pytest.mark.parametrize("pattern", ["*.parquet", "**/*.parquet", "**/?.parquet", "[ab].parquet", "*/[!x]*"])
def test_glob_scope_matches_what_glob_expands(tmp_path, pattern):
    """Pruning decides with a regex what `glob.glob` expanded: the two agree (glob is the reference)."""
    import glob
    import re

    from bigasp.prep.ingest import _glob_regex

    for name in ["a.parquet", "b.parquet", "ab.parquet", "d/c.parquet", "d/e/x.parquet", "d/y.tar"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    every = {str(p) for p in tmp_path.rglob("*") if p.is_file()}
    full = str(tmp_path / pattern)
    regex = re.compile(_glob_regex(full))
    assert {p for p in every if regex.fullmatch(p)} == {
        p for p in glob.glob(full, recursive=True) if p in every
    }


def test_cli_parquet_flags_and_config(tmp_path):
    from typer.testing import CliRunner

    from bigasp.cli import app

    f = tmp_path / "photos.parquet"
    pq.write_table(hf_table(IMAGES[:2]).rename_columns(["pixels", "text", "labels", "aesthetic"]), f)
    conf = tmp_path / "ingest.toml"
    conf.write_text('[ingest]\nallow_upscale = true\nparquet_columns = {labels = "tags"}\n')
    out = tmp_path / "ds"
    base = ["ingest", str(f), "--out", str(out), "--config", str(conf), "--no-progress", "--json"]
    # --column replaces the config's map (as any flag replaces its key), so both columns are named
    res = CliRunner().invoke(
        app, [*base, "--image-column", "pixels", "--column", "text=caption", "--column", "labels=tags"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["new"] == 2
    m = manifest(out)
    assert (
        m["path"][0] == f"{f}::pixels[0]"
        and m["captions"][0] == ["caption 0"]
        and m["tags"][0] == ["a", "t0"]
    )
    other = tmp_path / "ds2"  # the config file alone: labels -> tags, text stays in extra
    res = CliRunner().invoke(app, [*base[:3], str(other), *base[4:], "--image-column", "pixels"])
    assert res.exit_code == 0, res.output
    m = manifest(other)
    assert (
        m["tags"][1] == ["a", "t1"]
        and m["captions"][1] == []
        and json.loads(m["extra"][1])["text"] == "caption 1"
    )
    res = CliRunner().invoke(app, [*base, "--column", "text"])
    assert res.exit_code != 0 and "COLUMN=KEY" in res.output
    res = CliRunner().invoke(app, [*base, "--column", "text=caption", "--column", "aesthetic=caption"])
    assert res.exit_code != 0 and "one column per key" in str(res.exception or res.output)
    res = CliRunner().invoke(app, [*base, "--checksums", "sometimes"])
    assert res.exit_code != 0 and "checksums" in str(res.exception or res.output)
