"""img2dataset / WebDataset shards: tars written by `webdataset.TarWriter` in img2dataset's layout
(`00000.tar` with key.jpg/.txt/.json, `00000.parquet` and `00000_stats.json` beside it); the
`.json` record kept as provenance, failed downloads and sha256 mismatches as rejects."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from bigasp.prep.ingest import content_id, ingest
from bigasp.store import layout
from test_ingest import cfg, jpeg_bytes

SHRUNK = jpeg_bytes(64, 48, seed=31)  # stored after img2dataset resized it: its sha256 is the download's
DOWNLOADED = jpeg_bytes(128, 96, seed=31)
AS_IS = jpeg_bytes(64, 64, seed=32)  # stored as downloaded (resize_mode no, skip_reencode)
WRONG = jpeg_bytes(64, 64, seed=33)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def record(key: str, caption: str, image: bytes, original: bytes, orig_size: tuple[int, int], size) -> dict:
    """What img2dataset writes in key.json (url, caption, key, status, error_message, sizes, exif, sha256)."""
    return {
        "url": f"https://example.com/{key}.jpg",
        "caption": caption,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": size[0],
        "height": size[1],
        "original_width": orig_size[0],
        "original_height": orig_size[1],
        "exif": json.dumps({"Image Make": "Canon"}),
        "sha256": sha(original),
    }


@pytest.fixture
def shards(tmp_path) -> Path:
    out = tmp_path / "i2d"
    out.mkdir()
    metas = [
        record("000000000", "a red bicycle", SHRUNK, DOWNLOADED, (128, 96), (64, 48)),
        record("000000001", "a brick wall", AS_IS, AS_IS, (64, 64), (64, 64)),
    ]
    with wds.TarWriter(str(out / "00000.tar")) as tw:
        for meta, img in zip(metas, [SHRUNK, AS_IS], strict=True):
            tw.write(
                {
                    "__key__": meta["key"],
                    "jpg": img,
                    "txt": meta["caption"],
                    "json": json.dumps(meta, indent=4),
                }
            )
    failed = {**metas[0], "key": "000000002", "status": "failed_to_download", "error_message": "HTTP 404"}
    failed.update(width=None, height=None, original_width=None, original_height=None, exif=None, sha256=None)
    pq.write_table(pa.Table.from_pylist([*metas, failed]), out / "00000.parquet")
    (out / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 2, "failed_to_download": 1}))
    # another tool's WebDataset shard: a sha256 of the stored file, and a failed record with bytes
    with wds.TarWriter(str(out / "other.tar")) as tw:
        tw.write({"__key__": "bad", "jpg": WRONG, "json": json.dumps({"sha256": sha(AS_IS)})})
        tw.write(
            {
                "__key__": "ok",
                "jpg": jpeg_bytes(64, 64, seed=34),
                "json": json.dumps({"sha256": sha(jpeg_bytes(64, 64, seed=34))}),
            }
        )
        tw.write(
            {
                "__key__": "fail",
                "jpg": jpeg_bytes(64, 64, seed=35),
                "json": json.dumps({"status": "failed_to_resize", "error_message": "too big"}),
            }
        )
        # a status of the owner's own meaning is just metadata
        tw.write(
            {"__key__": "draft", "jpg": jpeg_bytes(64, 64, seed=36), "json": json.dumps({"status": "draft"})}
        )
    return out


def test_img2dataset_shards_keep_provenance_and_check_downloads(shards, tmp_path):
    ds = tmp_path / "ds"
    tars = sorted(shards.glob("*.tar"))  # `bigasp ingest i2d/*.tar`
    s = ingest(tars, ds, cfg(allow_upscale=True))
    m = {r["path"].rsplit("::", 1)[1]: r for r in pq.read_table(ds / layout.MANIFEST).to_pylist()}
    assert set(m) == {
        "000000000.jpg",
        "000000001.jpg",
        "ok.jpg",
        "draft.jpg",
    }
    assert json.loads(m["draft.jpg"]["extra"]) == {"status": "draft"}
    a, b = m["000000000.jpg"], m["000000001.jpg"]
    assert a["id"] == content_id(SHRUNK) and (a["width"], a["height"]) == (64, 48)
    assert a["captions"] == ["a red bicycle"]  # the .txt and the json caption, once
    extra = json.loads(a["extra"])
    assert extra["url"] == "https://example.com/000000000.jpg" and extra["key"] == "000000000"
    assert (extra["original_width"], extra["original_height"], extra["status"]) == (128, 96, "success")
    assert extra["sha256"] == sha(DOWNLOADED) and json.loads(extra["exif"]) == {"Image Make": "Canon"}
    assert json.loads(b["extra"])["sha256"] == sha(AS_IS)
    rej = {r["path"].rsplit("::", 1)[1]: r for r in pq.read_table(ds / layout.REJECTS).to_pylist()}
    assert set(rej) == {"bad.jpg", "fail.jpg"} and s.rejects == {"checksum_mismatch": 1, "download_failed": 1}
    detail = rej["bad.jpg"]["detail"]
    assert sha(AS_IS) in detail and sha(WRONG) in detail and "other.tar::bad.json" in detail
    assert "failed_to_resize" in rej["fail.jpg"]["detail"] and "too big" in rej["fail.jpg"]["detail"]
    # checksums = verify also checks img2dataset's own hash: the resized image is not the download
    s = ingest(tars, ds, cfg(allow_upscale=True, checksums="verify"))
    rej = {r["path"].rsplit("::", 1)[1]: r for r in pq.read_table(ds / layout.REJECTS).to_pylist()}
    assert rej["000000000.jpg"]["reason"] == "checksum_mismatch"
    assert (
        sha(DOWNLOADED) in rej["000000000.jpg"]["detail"]
        and "--checksums auto" in rej["000000000.jpg"]["detail"]
    )
    kept = {r["path"].rsplit("::", 1)[1] for r in pq.read_table(ds / layout.MANIFEST).to_pylist()}
    assert kept == {"000000001.jpg", "ok.jpg", "draft.jpg"}  # stored as downloaded: its hash matches
    # off: nothing is compared, so the mismatching images come back
    ingest(tars, ds, cfg(allow_upscale=True, checksums="off"))
    assert pq.read_metadata(ds / layout.MANIFEST).num_rows == 5


def test_bad_sha256_value_is_a_bad_sidecar(tmp_path):
    with wds.TarWriter(str(tmp_path / "s.tar")) as tw:
        tw.write({"__key__": "x", "jpg": AS_IS, "json": json.dumps({"sha256": "not-a-hash"})})
    ds = tmp_path / "ds"
    ingest([tmp_path / "s.tar"], ds, cfg(allow_upscale=True))
    (r,) = pq.read_table(ds / layout.REJECTS).to_pylist()
    assert r["reason"] == "bad_sidecar" and "'sha256' must be 64 hex digits" in r["detail"]


def test_img2dataset_files_layout(tmp_path):
    """output_format files: `00000/` holds key.jpg/.txt/.json; `00000.parquet` and `00000_stats.json`
    beside it describe the shard and are not images (nor rejects)."""
    out = tmp_path / "i2d"
    (out / "00000").mkdir(parents=True)
    meta = record("000000001", "a brick wall", AS_IS, AS_IS, (64, 64), (64, 64))
    (out / "00000" / "000000001.jpg").write_bytes(AS_IS)
    (out / "00000" / "000000001.txt").write_text(meta["caption"])
    (out / "00000" / "000000001.json").write_text(json.dumps(meta, indent=4))
    pq.write_table(pa.Table.from_pylist([meta]), out / "00000.parquet")
    (out / "00000_stats.json").write_text(json.dumps({"count": 1, "successes": 1}))
    ds = tmp_path / "ds"
    s = ingest([out], ds, cfg(allow_upscale=True, checksums="verify"))  # stored as downloaded: verified
    assert (s.new, s.rejects) == (1, {})
    (row,) = pq.read_table(ds / layout.MANIFEST).to_pylist()
    assert row["captions"] == ["a brick wall"] and json.loads(row["extra"])["url"] == meta["url"]
