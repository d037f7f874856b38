"""Ctrl-C during `bigasp ingest` (the installed executable): exit status 130, a line saying what
was committed, and a re-run that finishes the rest without losing or duplicating anything."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bigasp.store import layout
from hold_helpers import start_held
from test_ingest import jpeg_bytes


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_commits_what_was_examined_and_exits_130(tmp_path, workers):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(40):
        (src / f"u{i:03d}.jpg").write_bytes(jpeg_bytes(128, 128, seed=700 + i))
    for i in range(400):  # copies keep the folder cheap to write but every one is read and decoded
        shutil.copyfile(src / f"u{i % 40:03d}.jpg", src / f"c{i:04d}.jpg")
    out = tmp_path / "ds"
    exe = Path(sys.executable).with_name("bigasp")
    args = [str(exe), "ingest", str(src), "--out", str(out), "--no-progress", "--verify", "decode", "--workers", str(workers),
            "--set", "commit_every=20", "--set", "buckets.step=16", "--set", "buckets.min_area=3072",
            "--set", "buckets.max_area=4096"]  # fmt: skip
    proc, _ = start_held(args, "ingest.committed:2")  # 40 examined and committed in two parts
    parts = out / layout.PARTS_DIR
    assert len(list(parts.glob("sources-*.parquet"))) == 2
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (stdout, stderr)
    assert "interrupted" in stderr and "committed" in stderr and "Traceback" not in stderr
    committed = pq.read_table(out / "sources.parquet").num_rows
    assert 40 <= committed < 440  # what was committed, plus what was examined until the signal
    assert not list(parts.glob("*.parquet"))  # folded before exiting
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert pq.read_table(out / "sources.parquet").num_rows == 440
    manifest = pq.read_table(out / layout.MANIFEST)
    assert manifest.num_rows == 40 and sum(len(p) for p in manifest.column("paths").to_pylist()) == 440
