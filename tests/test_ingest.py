"""Ingest: every reject reason, EXIF size, mode conversions, sidecars, tar/list sources,
duplicates, incremental re-runs and crash safety (SIGKILL mid-run)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bigasp.buckets import BucketConfig
from bigasp.prep.config import IngestConfig
from bigasp.prep.images import to_rgb
from bigasp.prep.ingest import content_id, ingest
from bigasp.store import layout

TINY = BucketConfig(step=16, min_area=48 * 64, max_area=64 * 64)


def cfg(**kw) -> IngestConfig:
    return IngestConfig(buckets=TINY, progress=False, **kw)


def noise(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "RGBA": 4, "CMYK": 4}.get(mode)
    shape = (h, w, ch) if ch else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def jpeg_bytes(w=120, h=90, seed=0, orientation=None, mode="RGB"):
    buf = io.BytesIO()
    kw = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    noise(w, h, seed, mode).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("src")
    (d / "sub").mkdir()
    (d / "a.jpg").write_bytes(jpeg_bytes(seed=1))
    (d / "a.txt").write_text("a caption\n")
    (d / "a.json").write_text(
        json.dumps({"caption": ["second caption"], "tags": "x, y ,z", "score": 7, "source": "flickr",
                    "watermark": True, "camera": "X100", "lens": {"mm": 23}})
    )  # fmt: skip
    (d / "sub" / "rot.jpg").write_bytes(jpeg_bytes(120, 90, seed=2, orientation=6))
    (d / "sub" / "dup.jpg").write_bytes((d / "a.jpg").read_bytes())
    noise(120, 90, 3, "CMYK").save(d / "cmyk.jpg")
    pal = noise(120, 90, 4).convert("P")
    pal.info["transparency"] = 0
    pal.save(d / "pal.png", transparency=0)
    Image.fromarray((np.arange(120 * 90).reshape(90, 120) * 7 % 65536).astype(np.uint16)).save(d / "g16.png")
    noise(120, 90, 5, "RGBA").save(d / "rgba.png")
    noise(120, 90, 6).convert("L").save(d / "gray.jpg")
    noise(120, 90, 7).save(d / "web.webp", quality=80)
    (d / "empty.jpg").write_bytes(b"")
    full = jpeg_bytes(seed=8)
    (d / "trunc.jpg").write_bytes(full[: len(full) // 2])
    (d / "corrupt.jpg").write_bytes(np.random.default_rng(9).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (d / "notes.xyz").write_text("not an image")
    frames = [noise(120, 90, s) for s in (10, 11)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    noise(400, 400, 12).save(d / "big.png")
    (d / "small.jpg").write_bytes(jpeg_bytes(40, 30, seed=13))
    (d / "badside.jpg").write_bytes(jpeg_bytes(seed=14))
    (d / "badside.json").write_text("{not json")
    (d / "badscore.jpg").write_bytes(jpeg_bytes(seed=15))
    (d / "badscore.json").write_text('{"score": 12}')
    (d / ".hidden.jpg").write_bytes(jpeg_bytes(seed=16))
    return d


EXPECTED_REJECTS = {
    "empty.jpg": "empty",
    "trunc.jpg": "truncated",
    "corrupt.jpg": "corrupt",
    "notes.xyz": "unsupported_format",
    "anim.gif": "animated",
    "big.png": "too_large",
    "small.jpg": "too_small",
    "badside.jpg": "bad_sidecar",
    "badscore.jpg": "bad_sidecar",
}


def _rows(root: Path):
    return {Path(r["path"]).name: r for r in pq.read_table(root / layout.MANIFEST).to_pylist()}


def _rejects(root: Path):
    return {Path(r["path"]).name: r for r in pq.read_table(root / layout.REJECTS).to_pylist()}


def test_ingest_folder_rejects_modes_sidecars(src, tmp_path):
    out = tmp_path / "ds"
    s = ingest([src], out, cfg(max_pixels=100_000))
    rows, rej = _rows(out), _rejects(out)
    assert {k: v["reason"] for k, v in rej.items()} == EXPECTED_REJECTS
    assert all(v["detail"] for v in rej.values())
    assert set(rows) == {
        "a.jpg",
        "rot.jpg",
        "cmyk.jpg",
        "pal.png",
        "g16.png",
        "rgba.png",
        "gray.jpg",
        "web.webp",
    }
    assert s.new == 8 and s.duplicates == 1 and s.scanned == 18 and sum(s.rejects.values()) == 9
    a = rows["a.jpg"]
    assert a["paths"] == sorted([str(src / "a.jpg"), str(src / "sub" / "dup.jpg")])
    assert a["id"] == content_id((src / "a.jpg").read_bytes())
    assert a["captions"] == ["a caption", "second caption"]
    assert (
        a["tags"] == ["x", "y", "z"]
        and a["score"] == 7
        and a["source"] == "flickr"
        and a["watermark"] is True
    )
    assert json.loads(a["extra"]) == {"camera": "X100", "lens": {"mm": 23}}
    assert (a["width"], a["height"], a["format"], a["file_size"]) == (
        120,
        90,
        "JPEG",
        (src / "a.jpg").stat().st_size,
    )
    # EXIF orientation 6: stored 120x90, shown 90x120
    r = rows["rot.jpg"]
    assert (r["width"], r["height"], r["orientation"]) == (90, 120, 6)
    assert rows["g16.png"]["mode"] in ("I;16", "I") and rows["cmyk.jpg"]["mode"] == "CMYK"
    assert rows["pal.png"]["mode"] == "P" and rows["gray.jpg"]["score"] is None
    meta = json.loads((out / layout.DATASET_JSON).read_text())
    assert meta["format_version"] == layout.FORMAT_VERSION and meta["buckets"]["step"] == 16
    assert not list((out / layout.PARTS_DIR).glob("*.parquet"))


def test_options_keep_what_reject_by_default(src, tmp_path):
    out = tmp_path / "ds"
    ingest([src], out, cfg(allow_upscale=True, animated="first_frame"))
    rows = _rows(out)
    assert {"small.jpg", "anim.gif", "big.png"} <= set(rows)
    assert (rows["small.jpg"]["width"], rows["small.jpg"]["height"]) == (40, 30)


def test_full_decode_verification_catches_truncation(src, tmp_path):
    out = tmp_path / "ds"
    ingest([src / "a.jpg", src / "trunc.jpg"], out, cfg(verify="decode"))
    assert _rejects(out)["trunc.jpg"]["reason"] == "truncated"


def test_mode_conversions_to_rgb():
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    assert to_rgb(pal).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 127, 127)  # half red over white
    g16 = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert [to_rgb(g16).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)


def test_tar_and_list_sources(tmp_path):
    members = {"k/one.jpg": jpeg_bytes(seed=20), "k/one.txt": b"tar caption", "k/two.png": None}
    buf = io.BytesIO()
    noise(100, 100, 21).save(buf, "PNG")
    members["k/two.png"] = buf.getvalue()
    tpath = tmp_path / "shard-000.tar"
    with tarfile.open(tpath, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "loose.jpg").write_bytes(jpeg_bytes(seed=22))
    (tmp_path / "list.txt").write_text("# listed\nloose.jpg\nmissing.jpg\n")
    out = tmp_path / "ds"
    s = ingest([tpath, tmp_path / "list.txt"], out, cfg())
    rows = {
        r["path"].replace(str(tmp_path) + "/", ""): r
        for r in pq.read_table(out / layout.MANIFEST).to_pylist()
    }
    assert set(rows) == {"shard-000.tar::k/one.jpg", "shard-000.tar::k/two.png", "loose.jpg"}
    one = rows["shard-000.tar::k/one.jpg"]
    assert one["captions"] == ["tar caption"] and one["id"] == content_id(members["k/one.jpg"])
    assert one["tar_offset"] > 0
    assert _rejects(out)["missing.jpg"]["reason"] == "unreadable" and s.rejects == {"unreadable": 1}


def test_incremental_rerun_adds_only_new(src, tmp_path):
    data = tmp_path / "in"
    shutil.copytree(src, data)
    out = tmp_path / "ds"
    first = ingest([data], out, cfg())
    again = ingest([data], out, IngestConfig(progress=False))  # no bucket rule given: keep the recorded one
    assert again.new == 0 and again.skipped == again.scanned == first.scanned
    assert json.loads((out / layout.DATASET_JSON).read_text())["buckets"]["step"] == 16
    (data / "new.jpg").write_bytes(jpeg_bytes(seed=30))
    (data / "new-dup.jpg").write_bytes(jpeg_bytes(seed=30))
    third = ingest([data], out, cfg())
    assert third.new == 1 and third.duplicates == 1 and third.skipped == first.scanned
    ids = pq.read_table(out / layout.MANIFEST).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == first.new + 1
    assert ids == sorted(ids)


KILLER = """
import os, signal, sys
import bigasp.prep.ingest as ing
orig, n = ing.examine, [0]
def examine(*a, **k):
    n[0] += 1
    if n[0] == 25:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(*a, **k)
ing.examine = examine
from bigasp.buckets import BucketConfig
from bigasp.prep.config import IngestConfig
cfg = IngestConfig(buckets=BucketConfig(step=16, min_area=48 * 64, max_area=64 * 64), commit_every=10, progress=False)
ing.ingest([sys.argv[1]], sys.argv[2], cfg)
"""


def test_kill_mid_run_loses_nothing_committed_and_never_duplicates(tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    for i in range(40):
        (data / f"img{i:03d}.jpg").write_bytes(jpeg_bytes(100, 100, seed=100 + i))
    (data / "img999.jpg").write_bytes((data / "img000.jpg").read_bytes())  # a duplicate too
    out = tmp_path / "ds"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(data), str(out)], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    committed = list((out / layout.PARTS_DIR).glob("sources-*.parquet"))
    assert len(committed) == 2  # 24 examined, committed every 10
    assert not (out / layout.MANIFEST).exists()
    s = ingest([data], out, cfg())
    assert s.skipped == 20 and s.new == 20 and s.duplicates == 1
    ids = pq.read_table(out / layout.MANIFEST).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 40


def test_worker_processes_give_the_same_manifest(src, tmp_path):
    ingest([src], tmp_path / "one", cfg())
    ingest([src], tmp_path / "two", cfg(workers=2))
    cols = ["id", "path", "width", "height", "captions", "tags", "score", "extra"]
    a = pq.read_table(tmp_path / "one" / layout.MANIFEST).select(cols)
    b = pq.read_table(tmp_path / "two" / layout.MANIFEST).select(cols)
    assert a.equals(b) and len(a) == 9
    ra = pq.read_table(tmp_path / "one" / layout.REJECTS).sort_by("path").select(["path", "reason"])
    rb = pq.read_table(tmp_path / "two" / layout.REJECTS).sort_by("path").select(["path", "reason"])
    assert ra.equals(rb)


def test_ingest_cli_flags_and_config_file(src, tmp_path):
    from typer.testing import CliRunner

    from bigasp.cli import app

    conf = tmp_path / "ingest.toml"
    conf.write_text(
        "[ingest]\nmax_pixels = 100000\n[ingest.buckets]\nstep = 16\nmin_area = 3072\nmax_area = 4096\n"
    )
    out = tmp_path / "ds"
    args = ["ingest", str(src), "--out", str(out), "--config", str(conf), "--no-progress", "--json"]
    res = CliRunner().invoke(app, [*args, "--set", "animated=first_frame", "--allow-upscale"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["new"] == 10 and summary["duplicates"] == 1  # anim.gif and small.jpg kept
    assert summary["rejects"]["too_large"] == 1  # from the config file
    res = CliRunner().invoke(app, ["ingest", str(src), "--out", str(out), "--set", "verify=full"])
    assert res.exit_code != 0 and "verify" in str(res.exception or res.output)


def test_symlink_cycles_and_dangling_links_do_not_stop_the_scan(tmp_path):
    data = tmp_path / "in"
    (data / "a").mkdir(parents=True)
    (data / "a" / "one.jpg").write_bytes(jpeg_bytes(seed=40))
    (data / "a" / "loop").symlink_to(data)  # a -> loop -> in -> a ...
    (data / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    s = ingest([data], tmp_path / "ds", cfg())
    assert s.new == 1 and s.scanned == 1


def test_pillow_bomb_error_is_a_too_large_reject(src, tmp_path):
    # 160,000 px > 2 x 10,000: Pillow itself raises DecompressionBombError inside open()
    s = ingest([src / "big.png"], tmp_path / "ds", cfg(max_pixels=10_000))
    assert s.rejects == {"too_large": 1}
    assert "pixels" in _rejects(tmp_path / "ds")["big.png"]["detail"]
