"""Incremental ingest follows the source: replaced, removed and re-captioned files, fixed
rejects, settings a reject depends on, duplicate copies merged independently of order and
worker count, and every fix a reject message suggests working when followed literally."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bigasp.prep.config import EncodeConfig
from bigasp.prep.encode import encode
from bigasp.prep.ingest import content_id, ingest
from bigasp.store import LatentDataset, layout
from test_ingest import cfg, jpeg_bytes, noise


def manifest(root: Path) -> list[dict]:
    return pq.read_table(root / layout.MANIFEST).to_pylist()


def by_name(root: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in manifest(root)}


def rejects(root: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in pq.read_table(root / layout.REJECTS).to_pylist()}


def touch_later(path: Path, seconds: float = 10) -> None:
    st = path.stat()
    os.utime(path, (st.st_atime + seconds, st.st_mtime + seconds))


@pytest.fixture
def data(tmp_path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for i in range(4):
        (d / f"img{i}.jpg").write_bytes(jpeg_bytes(100, 100, seed=200 + i))
    (d / "img0.txt").write_text("first caption")
    return d


def test_replaced_image_replaces_its_row_and_is_encoded_again(data, tmp_path):
    out = tmp_path / "ds"
    ingest([data], out, cfg())
    ecfg = EncodeConfig(vae="tiny", num_workers=0, batch_size=4, progress=False)
    encode(out, ecfg)
    old_id = by_name(out)["img1.jpg"]["id"]
    new_bytes = jpeg_bytes(100, 100, seed=999)
    (data / "img1.jpg").write_bytes(new_bytes)
    touch_later(data / "img1.jpg")
    s = ingest([data], out, cfg())
    assert (s.updated, s.new, s.skipped, s.removed) == (1, 0, 3, 0)
    rows = manifest(out)
    assert len(rows) == 4 and old_id not in {r["id"] for r in rows}
    assert by_name(out)["img1.jpg"]["id"] == content_id(new_bytes)
    # the old latent no longer joins the manifest; encode encodes the new bytes
    assert len(LatentDataset(out)) == 3
    e = encode(out, ecfg)
    assert e.encoded == 1 and e.skipped == 3
    ds = LatentDataset(out)
    assert len(ds) == 4 and ds.n_orphan_latents == 1


def test_removed_files_leave_by_default_and_stay_with_no_prune(data, tmp_path):
    out = tmp_path / "ds"
    (data / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    ingest([data], out, cfg())
    assert "broken.jpg" in rejects(out)
    (data / "img2.jpg").unlink()
    kept = ingest([data], out, cfg(prune=False))
    assert kept.removed == 0 and "img2.jpg" in by_name(out)
    (data / "img3.jpg").unlink()
    (data / "broken.jpg").unlink()
    s = ingest([data], out, cfg())
    assert s.removed == 3  # img2, img3 and the reject broken.jpg
    assert set(by_name(out)) == {"img0.jpg", "img1.jpg"} and "broken.jpg" not in rejects(out)


def test_prune_only_touches_this_runs_sources(data, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "o.jpg").write_bytes(jpeg_bytes(100, 100, seed=300))
    out = tmp_path / "ds"
    ingest([data], out, cfg())
    ingest([other], out, cfg())
    (data / "img3.jpg").unlink()
    s = ingest([data], out, cfg())
    assert s.removed == 1 and set(by_name(out)) == {"img0.jpg", "img1.jpg", "img2.jpg", "o.jpg"}
    # a path list prunes what it listed before and lists no more
    lst = tmp_path / "list.txt"
    (tmp_path / "listed.jpg").write_bytes(jpeg_bytes(100, 100, seed=301))
    lst.write_text("listed.jpg\n")
    ingest([lst], out, cfg())
    assert "listed.jpg" in by_name(out)
    lst.write_text("")
    assert ingest([lst], out, cfg()).removed == 1 and "listed.jpg" not in by_name(out)
    assert set(by_name(out)) == {"img0.jpg", "img1.jpg", "img2.jpg", "o.jpg"}


def test_sidecar_edits_are_reread(data, tmp_path):
    out = tmp_path / "ds"
    ingest([data], out, cfg())
    img_id = by_name(out)["img0.jpg"]["id"]
    (data / "img0.txt").write_text("an edited caption that is longer")
    (data / "img1.json").write_text(json.dumps({"tags": ["new"], "score": 3}))
    s = ingest([data], out, cfg())
    assert s.updated == 2 and s.skipped == 2
    rows = by_name(out)
    assert rows["img0.jpg"]["captions"] == ["an edited caption that is longer"]
    assert rows["img0.jpg"]["id"] == img_id  # same bytes: latents stay valid
    assert rows["img1.jpg"]["tags"] == ["new"] and rows["img1.jpg"]["score"] == 3
    # same size, only the mtime moves: still re-read
    (data / "img0.txt").write_text("an edited caption that is LONGER")
    touch_later(data / "img0.txt")
    (data / "img1.json").unlink()
    s = ingest([data], out, cfg())
    rows = by_name(out)
    assert rows["img0.jpg"]["captions"] == ["an edited caption that is LONGER"]
    assert rows["img1.jpg"]["tags"] == [] and rows["img1.jpg"]["score"] is None


def test_fixed_bad_sidecar_and_fixed_image_are_retried(data, tmp_path):
    out = tmp_path / "ds"
    (data / "img2.json").write_text("{not json")
    full = jpeg_bytes(100, 100, seed=400)
    (data / "cut.jpg").write_bytes(full[: len(full) // 2])
    ingest([data], out, cfg())
    assert {k: v["reason"] for k, v in rejects(out).items()} == {
        "img2.jpg": "bad_sidecar",
        "cut.jpg": "truncated",
    }
    again = ingest([data], out, cfg())
    assert again.retried == 0 and again.skipped == 5  # nothing changed: not read again
    (data / "img2.json").write_text('{"caption": "fixed"}')
    (data / "cut.jpg").write_bytes(full)
    s = ingest([data], out, cfg())
    assert s.retried == 2 and not rejects(out)
    assert by_name(out)["img2.jpg"]["captions"] == ["fixed"] and "cut.jpg" in by_name(out)


def test_retry_rejects_examines_unchanged_rejects(data, tmp_path):
    out = tmp_path / "ds"
    (data / "bad.jpg").write_bytes(b"not an image at all")
    ingest([data], out, cfg())
    assert ingest([data], out, cfg()).retried == 0
    s = ingest([data], out, cfg(retry_rejects=True))
    assert s.retried == 1 and s.rejects == {"corrupt": 1}


def _copies(root: Path) -> None:
    """One photo under five names: uncaptioned first, captioned and scored copies after."""
    img = jpeg_bytes(100, 100, seed=500)
    root.mkdir()
    for name in ("a0.jpg", "b1.jpg", "c2.jpg", "d3.jpg", "e4.jpg"):
        (root / name).write_bytes(img)
    (root / "b1.txt").write_text("a captioned copy")
    (root / "c2.json").write_text(
        json.dumps({"caption": "json caption", "tags": ["x", "y"], "score": 6, "source": "s1", "k": 1})
    )
    (root / "d3.json").write_text(
        json.dumps({"tags": "y, z", "score": 2, "source": "s2", "watermark": True, "k": 2, "j": 3})
    )
    (root / "e4.json").write_text(json.dumps({"watermark": False}))
    for i in range(6):
        (root / f"other{i}.jpg").write_bytes(jpeg_bytes(100, 100, seed=600 + i))


def test_duplicates_merge_metadata_of_every_copy(tmp_path):
    src = tmp_path / "in"
    _copies(src)
    out = tmp_path / "ds"
    s = ingest([src], out, cfg())
    assert s.new == 7 and s.duplicates == 4 and not s.rejects
    row = by_name(out)["a0.jpg"]
    assert row["paths"] == [str(src / n) for n in ("a0.jpg", "b1.jpg", "c2.jpg", "d3.jpg", "e4.jpg")]
    assert row["captions"] == ["a captioned copy", "json caption"]
    assert row["tags"] == ["x", "y", "z"]
    assert (row["score"], row["source"], row["watermark"]) == (6, "s1", True)  # first in path order; any mark
    assert json.loads(row["extra"]) == {"k": 1, "j": 3}
    # removing the captioned copy drops its caption, the rest stays merged
    (src / "b1.jpg").unlink()
    ingest([src], out, cfg())
    assert by_name(out)["a0.jpg"]["captions"] == ["json caption"]


def test_manifest_does_not_depend_on_order_or_workers(tmp_path):
    src = tmp_path / "in"
    _copies(src)
    names = sorted(p.name for p in src.glob("*.jpg"))
    tables = []
    for seed, workers in ((0, 1), (1, 2), (2, 1)):
        random.Random(seed).shuffle(names)
        lst = tmp_path / f"list{seed}.txt"
        lst.write_text("".join(f"in/{n}\n" for n in names))
        out = tmp_path / f"ds{seed}"
        ingest([lst], out, cfg(workers=workers, commit_every=3))
        tables.append(pq.read_table(out / layout.MANIFEST).drop_columns(["mtime"]))
    folder = tmp_path / "ds-folder"
    ingest([src], folder, cfg(workers=2))
    tables.append(pq.read_table(folder / layout.MANIFEST).drop_columns(["mtime"]))
    assert all(t.equals(tables[0]) for t in tables[1:])


def _bigasp(*args: str):
    from typer.testing import CliRunner

    from bigasp.cli import app

    return CliRunner().invoke(app, list(args))


FIX = re.compile(r"\((--[a-z-]+(?: \S+)?) keeps")


def test_every_suggested_fix_works_as_written(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "small.jpg").write_bytes(jpeg_bytes(40, 30, seed=1))
    frames = [noise(100, 100, s) for s in (2, 3)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    noise(400, 400, 4).save(src / "big.png")  # 160,000 px
    noise(150, 150, 5).save(src / "a-mid.png")  # 22,500 px: above 20,000, below Pillow's own 2x bomb check
    (src / "heavy.jpg").write_bytes(jpeg_bytes(100, 100, seed=6) + b"\0" * 600_000)
    (src / "ok.jpg").write_bytes(jpeg_bytes(100, 100, seed=7))
    out = tmp_path / "ds"
    base = ["ingest", str(src), "--out", str(out), "--no-progress", "--set", "buckets.step=16",
            "--set", "buckets.min_area=3072", "--set", "buckets.max_area=4096",
            "--max-pixels", "20000", "--max-file-size", "40000"]  # fmt: skip
    res = _bigasp(*base)
    assert res.exit_code == 0, res.output
    first = rejects(out)
    assert set(first) == {"small.jpg", "anim.gif", "big.png", "a-mid.png", "heavy.jpg"}
    extra: list[str] = []
    for name in sorted(first):
        for _ in range(2):  # a file over two limits names the second once the first is lifted
            detail = rejects(out)[name]["detail"]
            fix = FIX.search(detail)
            assert fix, f"{name}: no runnable fix in {detail!r}"
            extra += fix.group(1).split(" ")
            res = _bigasp(*base, *extra)
            assert res.exit_code == 0, res.output
            if name in by_name(out):
                break
        assert name in by_name(out), f"{name}: {fix.group(1)!r} did not keep it ({rejects(out).get(name)})"
    assert set(by_name(out)) == {"ok.jpg", *first}


def test_crash_between_sources_and_manifest_writes_is_repaired(data, tmp_path):
    out = tmp_path / "ds"
    ingest([data], out, cfg())
    # as if killed after sources.parquet was rewritten (one path pruned) but before the manifest
    t = pq.read_table(out / "sources.parquet")
    keep = [not p.endswith("img3.jpg") for p in t.column("path").to_pylist()]
    pq.write_table(
        t.filter(keep).replace_schema_metadata({"bigasp.generation": "other"}), out / "sources.parquet"
    )
    (data / "img3.jpg").unlink()
    s = ingest([data], out, cfg(prune=False))
    assert s.skipped == 3 and set(by_name(out)) == {"img0.jpg", "img1.jpg", "img2.jpg"}


def test_manifest_from_an_older_version_is_read_and_rebuilt(data, tmp_path):
    from bigasp.store.manifest import read_manifest

    out = tmp_path / "ds"
    (data / "dup.jpg").write_bytes((data / "img1.jpg").read_bytes())
    (data / "dup.txt").write_text("the copy's caption")
    ingest([data], out, cfg())
    # what an older bigasp left: no sources.parquet, no `paths` column, the copy a `duplicate` reject
    t = pq.read_table(out / layout.MANIFEST).drop_columns(["paths"])
    pq.write_table(t.replace_schema_metadata(None), out / layout.MANIFEST)
    (out / "sources.parquet").unlink()
    old = read_manifest(*layout.url_to_fs(str(out)))
    assert old.column("paths").null_count == len(old) == 4
    dup = {"path": str(data / "dup.jpg"), "reason": "duplicate", "detail": "same bytes", "stage": "ingest"}
    pq.write_table(pq.read_table(out / layout.REJECTS).from_pylist([dup]), out / layout.REJECTS)
    s = ingest([data], out, cfg())
    assert s.updated == 4 and not s.rejects and not rejects(out)
    row = by_name(out)["dup.jpg"]
    assert row["captions"] == ["the copy's caption"] and len(row["paths"]) == 2
