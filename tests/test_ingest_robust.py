"""Bad input never aborts an ingest run: each case becomes a reject with a reason (or a clean
row), the run goes on, and the dataset stays readable. Settings that make no sense are refused
up front with one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bigasp.cli import app
from bigasp.errors import DataError
from bigasp.prep.config import IngestConfig
from bigasp.prep.ingest import content_id, ingest
from bigasp.store import layout
from test_ingest import cfg, jpeg_bytes, noise


def rows(root: Path) -> dict[str, dict]:
    return {r["path"]: r for r in pq.read_table(root / layout.MANIFEST).to_pylist()}


def rejects(root: Path) -> dict[str, dict]:
    return {r["path"]: r for r in pq.read_table(root / layout.REJECTS).to_pylist()}


def names(d: dict) -> dict[str, str]:
    return {Path(k.split("::")[-1]).name: v["reason"] for k, v in d.items()}


def test_non_utf8_names_in_folders_are_rejects_not_crashes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.jpg").write_bytes(jpeg_bytes(seed=1))
    bad = os.fsencode(src) + b"/caf\xe9.jpg"
    with open(bad, "wb") as f:
        f.write(jpeg_bytes(seed=2))
    s = ingest([src], tmp_path / "ds", cfg())
    assert s.new == 1 and s.rejects == {"bad_filename": 1}
    (path, rej), = rejects(tmp_path / "ds").items()  # fmt: skip
    assert path.endswith("caf\\xe9.jpg") and "UTF-8" in rej["detail"] and "rename" in rej["detail"]


def test_non_utf8_names_in_tars_and_path_lists(tmp_path):
    tpath = tmp_path / "s.tar"
    with tarfile.open(
        tpath, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for name, data in (("ok.jpg", jpeg_bytes(seed=3)), ("caf\udce9.jpg", jpeg_bytes(seed=4))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "listed.jpg").write_bytes(jpeg_bytes(seed=5))
    (tmp_path / "list.txt").write_bytes(b"listed.jpg\nna\xefve.jpg\n")
    s = ingest([tpath, tmp_path / "list.txt"], tmp_path / "ds", cfg())
    assert s.new == 2 and s.rejects == {"bad_filename": 2}


SCORES = ["NaN", "Infinity", "-Infinity", "1e400", "9" * 5000, "4.5", '"7"', "true", "[1]"]


def test_absurd_sidecar_numbers_and_nesting_are_bad_sidecars(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, score in enumerate(SCORES):
        (src / f"s{i}.jpg").write_bytes(jpeg_bytes(seed=10 + i))
        (src / f"s{i}.json").write_text('{"score": ' + score + "}")
    (src / "deep.jpg").write_bytes(jpeg_bytes(seed=30))
    (src / "deep.json").write_text('{"a": ' + "[" * 5000 + "]" * 5000 + "}")
    (src / "deeper.jpg").write_bytes(jpeg_bytes(seed=31))
    (src / "deeper.json").write_text('{"a": ' + "[" * 200_000 + "}")
    (src / "surrogate.jpg").write_bytes(jpeg_bytes(seed=32))
    (src / "surrogate.json").write_text('{"caption": "bad \\ud800 text"}')
    s = ingest([src], tmp_path / "ds", cfg())
    assert s.new == 0 and s.rejects == {"bad_sidecar": len(SCORES) + 3}
    details = {Path(k).name: v["detail"] for k, v in rejects(tmp_path / "ds").items()}
    assert "score" in details["s0.jpg"] and "got inf" in details["s4.jpg"]
    assert "nested deeper" in details["deep.jpg"] and "surrogate" in details["surrogate.jpg"]
    assert all(len(d) < 300 for d in details.values())


def test_non_finite_values_in_extra_stay_valid_json(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "x.jpg").write_bytes(jpeg_bytes(seed=40))
    (src / "x.json").write_text(
        '{"a": NaN, "b": [Infinity, -Infinity, 1e400, 1.5], "c": {"d": ' + "1" * 5000 + '}, "e": "ok"}'
    )
    ingest([src], tmp_path / "ds", cfg())
    (row,) = rows(tmp_path / "ds").values()

    def strict(name):
        raise ValueError(f"{name} is not JSON")

    extra = json.loads(row["extra"], parse_constant=strict)
    assert extra == {"a": None, "b": [None, None, None, 1.5], "c": {"d": None}, "e": "ok"}


def _tar(path: Path, members: list[tuple[str, bytes]]) -> list[int]:
    """Write an uncompressed tar; returns each member's data offset."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        return [m.offset_data for m in tf.getmembers()]


def test_truncated_tar_keeps_readable_members(tmp_path):
    imgs = [(f"m{i}.jpg", jpeg_bytes(seed=50 + i)) for i in range(4)]
    offsets = _tar(tmp_path / "full.tar", imgs)
    whole = (tmp_path / "full.tar").read_bytes()
    # cut inside the third member's data: two kept, the third rejected, the fourth never seen
    (tmp_path / "cut-data.tar").write_bytes(whole[: offsets[2] + 100])
    # cut inside the fourth member's header
    (tmp_path / "cut-head.tar").write_bytes(whole[: offsets[3] - 300])
    (tmp_path / "garbage.tar").write_bytes(b"\x1f\x8b" + os.urandom(3000))
    out = tmp_path / "ds"
    s = ingest([tmp_path / "cut-data.tar", tmp_path / "cut-head.tar", tmp_path / "garbage.tar"], out, cfg())
    kept = sorted(Path(p.split("::")[1]).name + "@" + Path(p.split("::")[0]).stem for p in rows(out))
    assert kept == ["m0.jpg@cut-data", "m1.jpg@cut-data", "m2.jpg@cut-head"]  # copies merged
    assert rows(out)[f"{tmp_path / 'cut-data.tar'}::m0.jpg"]["id"] == content_id(imgs[0][1])
    rej = rejects(out)
    assert rej[f"{tmp_path / 'cut-data.tar'}::m2.jpg"]["reason"] == "truncated"
    assert rej[f"{tmp_path / 'cut-head.tar'}::"]["reason"] == "truncated"
    assert "3 members" in rej[f"{tmp_path / 'cut-head.tar'}::"]["detail"]
    assert rej[str(tmp_path / "garbage.tar")]["reason"] == "corrupt"
    assert "gunzip" in rej[str(tmp_path / "garbage.tar")]["detail"]
    assert s.rejects["truncated"] >= 2


def test_tar_links_and_devices_are_counted_rejects(tmp_path):
    tpath = tmp_path / "links.tar"
    data = jpeg_bytes(seed=60)
    with tarfile.open(tpath, "w") as tf:
        info = tarfile.TarInfo("real.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        for name, kind in (("soft.jpg", tarfile.SYMTYPE), ("hard.jpg", tarfile.LNKTYPE), ("dev", tarfile.CHRTYPE),
                           ("fifo", tarfile.FIFOTYPE)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "real.jpg" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tf.addfile(info)
    s = ingest([tpath], tmp_path / "ds", cfg())
    assert s.new == 1 and s.rejects == {"not_a_file": 4}
    details = {Path(k.split("::")[1]).name: v["detail"] for k, v in rejects(tmp_path / "ds").items()}
    assert "symbolic link" in details["soft.jpg"] and "hard link" in details["hard.jpg"]


def test_fifo_in_a_folder_is_a_reject_and_never_blocks(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(seed=61))
    os.mkfifo(src / "pipe.jpg")
    s = ingest([src], tmp_path / "ds", cfg())
    assert s.new == 1 and s.rejects == {"not_a_file": 1}


def test_malformed_animated_gifs_never_raise(tmp_path):
    frames = [noise(120, 90, s) for s in (70, 71, 72)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    gif = buf.getvalue()
    src = tmp_path / "in"
    src.mkdir()
    for cut in range(len(gif) // 3, len(gif), 97):
        (src / f"cut{cut}.gif").write_bytes(gif[:cut])
        (src / f"flip{cut}.gif").write_bytes(gif[:cut] + bytes([gif[cut] ^ 0xFF]) + gif[cut + 1 :])
    s = ingest([src], tmp_path / "ds", cfg(animated="first_frame"))
    assert "internal_error" not in s.rejects
    assert s.new + s.duplicates + sum(s.rejects.values()) == s.scanned


def test_big_files_are_streamed_and_size_limited(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    img = jpeg_bytes(200, 200, seed=80)
    big = src / "big.jpg"
    with open(big, "wb") as f:  # a valid JPEG followed by a 48 MiB trailer (as motion photos have)
        f.write(img)
        f.write(b"\0" * (48 << 20))
    huge = src / "huge.jpg"
    with open(huge, "wb") as f:  # sparse: 1 GiB on paper, never read
        f.truncate(1 << 30)
    tracemalloc.start()
    try:
        s = ingest([src], tmp_path / "ds", cfg(max_file_size=64 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert s.new == 1 and s.rejects == {"too_large": 1}
    assert peak < 16 << 20, f"peak Python memory {peak >> 20} MiB: the file was read whole"
    assert rows(tmp_path / "ds")[str(big)]["id"] == content_id(big.read_bytes())
    assert "--max-file-size 1073741824" in rejects(tmp_path / "ds")[str(huge)]["detail"]


@pytest.mark.parametrize(
    "flag",
    [["--workers", "0"], ["--max-pixels", "0"], ["--max-pixels", "-5"], ["--max-pixels", str(10**15)],
     ["--max-file-size", "0"]],
)  # fmt: skip
def test_absurd_settings_are_refused(tmp_path, flag):
    res = CliRunner().invoke(app, ["ingest", str(tmp_path), "--out", str(tmp_path / "ds"), *flag])
    assert res.exit_code != 0
    err = str(res.exception) if res.exception else res.output
    assert flag[0].lstrip("-").replace("-", "_") in err
    assert not (tmp_path / "ds").exists()


def test_absurd_worker_counts_are_refused():
    # checked on the config alone: a build without the bound would start that many processes
    from bigasp.config import validate
    from bigasp.errors import ConfigError

    for workers in (513, 100_000):
        with pytest.raises(ConfigError, match="workers"):
            validate(IngestConfig, {"workers": workers}, "command-line flags")


def test_out_inside_the_source_folder_is_refused(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(seed=90))
    for out in (src / "ds", src):
        with pytest.raises(DataError, match="inside the source folder"):
            ingest([src], out, cfg())
    assert not (src / "ds").exists()


@pytest.mark.parametrize("text", ["{not json", '{"format_version": 1, "buckets": {"step": 7}}', "[1, 2]"])
def test_damaged_dataset_json_is_one_clear_error(tmp_path, text):
    from bigasp.errors import BigaspError

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(seed=91))
    out = tmp_path / "ds"
    out.mkdir()
    (out / layout.DATASET_JSON).write_text(text)
    with pytest.raises(BigaspError, match=r"dataset\.json"):
        ingest([src], out, IngestConfig(progress=False))


def _bigasp(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("bigasp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120, env=env)


def _usage_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def test_out_that_cannot_be_a_folder_is_exit_2_naming_it(tmp_path):
    """The installed `bigasp ingest`: --out a file, or under a file, is one line and exit 2; the file is kept."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(seed=1))
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    line = _usage_line(_bigasp("ingest", str(src), "--out", str(f), "--no-progress"))
    assert line.startswith(f"error: --out must be a folder: {f} is a file"), line
    line = _usage_line(_bigasp("ingest", str(src), "--out", str(f / "ds"), "--no-progress"))
    assert line.startswith("error: --out must be a folder bigasp can create:") and str(f / "ds") in line, line
    assert "Not a directory" in line and f.read_text() == "mine"


def test_out_on_a_read_only_file_system_is_exit_2_naming_it(tmp_path):
    """A read-only mount (as root: permissions do not stop root, a read-only file system does)."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(seed=1))
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "ds").mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        (ro / "ds").chmod(0o555)
    elif subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], capture_output=True
    ).returncode:
        pytest.skip("cannot make a read-only folder here (root, and mounting is not permitted)")
    try:
        line = _usage_line(_bigasp("ingest", str(src), "--out", str(ro / "new"), "--no-progress"))
        assert line.startswith("error: --out must be a folder bigasp can create:") and str(ro / "new") in line
        if os.geteuid() != 0:  # an existing folder it may not write
            line = _usage_line(_bigasp("ingest", str(src), "--out", str(ro / "ds"), "--no-progress"))
            assert (
                line.startswith("error: --out must be a folder bigasp can write:") and str(ro / "ds") in line
            )
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=True)
        else:
            ro.chmod(0o755)


def _photos(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"p{i:03d}.jpg").write_bytes(jpeg_bytes(128, 128, seed=900 + i))
    return folder


INGEST_SETS = ["--no-progress", "--set", "commit_every=10", "--set", "buckets.step=16",
               "--set", "buckets.min_area=3072", "--set", "buckets.max_area=4096"]  # fmt: skip


def test_write_failure_during_ingest_is_one_line_naming_the_file_and_what_is_kept(tmp_path):
    """A real OS write failure on any machine: the installed `bigasp ingest` under a file-size limit
    (RLIMIT_FSIZE: the kernel fails writes past it with EFBIG, as a full disk fails them with ENOSPC)."""
    import resource

    src = _photos(tmp_path / "in", 30)
    out = tmp_path / "ds"

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))

    exe = Path(sys.executable).with_name("bigasp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run([str(exe), "ingest", str(src), "--out", str(out), *INGEST_SETS], capture_output=True,
                         text=True, timeout=120, env=env, preexec_fn=small_files)  # fmt: skip
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    parts = out / layout.PARTS_DIR
    assert lines[0].startswith(f"error: writing {parts}/sources-"), lines[0]
    assert "failed (File too large)" in lines[0] and "this run committed before it" in lines[0]
    assert "no partial file is left" in lines[0] and "run the same `bigasp ingest` command again" in lines[0]
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]
    again = _bigasp("ingest", str(src), "--out", str(out), *INGEST_SETS)
    assert again.returncode == 0, again.stderr
    assert pq.read_table(out / layout.MANIFEST).num_rows == 30


def test_full_disk_during_ingest_on_a_real_small_filesystem(tmp_path):
    """ENOSPC for real: the dataset on a tmpfs with room for a few parts (needs mount rights, as
    root; skipped where mounting is not permitted). The parts committed before are kept and a
    re-run on a roomier disk finishes without examining them again."""
    import shutil

    src = _photos(tmp_path / "in", 120)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()})")
    try:
        out = mnt / "ds"
        res = _bigasp("ingest", str(src), "--out", str(out), *INGEST_SETS)
        assert res.returncode == 2, res.stderr
        (line,) = res.stderr.strip().splitlines()
        assert line.startswith(f"error: writing {out}/") and "failed (No space left on device)" in line, line
        kept = sum(pq.read_table(p).num_rows for p in (out / layout.PARTS_DIR).glob("sources-*.parquet"))
        assert (
            kept > 0
            and f"the {kept} image(s) this run committed before it (in {out / layout.PARTS_DIR}) are kept"
            in line
        )
        assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]
        moved = shutil.copytree(out, tmp_path / "ds", ignore=shutil.ignore_patterns(".ingest.lock"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    again = _bigasp("ingest", str(src), "--out", str(moved), *INGEST_SETS, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["skipped"] == kept  # committed before the disk filled: not read again
    assert pq.read_table(moved / layout.MANIFEST).num_rows == 120
