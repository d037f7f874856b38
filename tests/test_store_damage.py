"""Truncated Parquet files of a dataset, through the installed `bigasp`: one line naming the file
and the fix in `dataset info`, `dataset verify`, `encode` and `ingest`, and the fix works: a
deleted latent index is rebuilt by encode from its shard's footer, a damaged manifest by ingest
from sources.parquet."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bigasp.buckets import BucketConfig
from bigasp.prep import encode as enc
from bigasp.prep.config import EncodeConfig, IngestConfig
from bigasp.prep.ingest import ingest
from bigasp.store import layout

TINY = BucketConfig(step=16, min_area=48 * 64, max_area=64 * 64)
BIGASP = Path(sys.executable).with_name("bigasp")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIGASP), *args], capture_output=True, text=True, timeout=180, env=env)


def _one_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "<Buffer>" not in lines[0]
    return lines[0]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("damage")
    src = d / "src"
    src.mkdir()
    rng = np.random.default_rng(3)
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / f"im{k}.png")
    ingest([src], d / "ds", IngestConfig(buckets=TINY, progress=False))
    cfg = EncodeConfig(vae="tiny", num_workers=0, batch_size=2, progress=False, shard_size=2)
    assert enc.encode(d / "ds", cfg).encoded == 6
    return src, d / "ds"


def _copy(ds: Path, to: Path) -> Path:
    shutil.copytree(ds, to)
    return to


@pytest.mark.slow
def test_truncated_latent_index_names_the_file_and_encode_rebuilds_it(encoded, tmp_path):
    _, original = encoded
    ds = _copy(original, tmp_path / "ds")
    index = sorted((ds / layout.INDEX_DIR).glob("*.parquet"))[1]
    before = pq.read_table(index)
    _truncate(index)
    fix = f"delete it and run `bigasp encode {ds}` with the same --vae"
    for args in (["dataset", "verify", str(ds)], ["dataset", "info", str(ds)]):
        _one_line(_cli(*args), str(index), "is damaged", fix)
    _one_line(
        _cli("encode", str(ds), "--vae", "tiny", "--num-workers", "0", "--no-progress"), str(index), fix
    )
    index.unlink()  # the fix the message gives
    res = _cli("encode", str(ds), "--vae", "tiny", "--num-workers", "0", "--no-progress")
    assert res.returncode == 0 and "0 encoded, 6 already done" in res.stdout, res.stderr[-2000:]
    assert pq.read_table(index).equals(before)  # rebuilt from the shard's footer, as written
    res = _cli("dataset", "verify", str(ds))
    assert res.returncode == 0 and "6 of 6 latents OK" in res.stdout, res.stderr


@pytest.mark.slow
def test_truncated_manifest_names_the_file_and_ingest_rebuilds_it(encoded, tmp_path):
    src, original = encoded
    ds = _copy(original, tmp_path / "ds")
    manifest = ds / layout.MANIFEST
    before = pq.read_table(manifest).drop_columns([]).to_pylist()
    _truncate(manifest)
    fix = "re-run `bigasp ingest` with the same sources and --out"
    for args in (["dataset", "verify", str(ds)], ["dataset", "info", str(ds)]):
        _one_line(_cli(*args), str(manifest), "is damaged", fix)
    _one_line(
        _cli("encode", str(ds), "--vae", "tiny", "--num-workers", "0", "--no-progress"), str(manifest), fix
    )
    res = _cli("ingest", str(src), "--out", str(ds), "--no-progress", "--set", "buckets.step=16")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "damaged; rebuilding it from" in res.stderr
    assert pq.read_table(manifest).to_pylist() == before
    res = _cli("dataset", "verify", str(ds))
    assert res.returncode == 0 and "6 of 6 latents OK" in res.stdout, res.stderr


def test_truncated_sources_or_rejects_in_ingest_name_the_file(encoded, tmp_path):
    src, original = encoded
    for name in (layout.REJECTS, "sources.parquet"):
        ds = _copy(original, tmp_path / name)
        path = ds / name
        if not path.exists():
            pq.write_table(pq.read_table(ds / "sources.parquet").slice(0, 0), path)
        _truncate(path)
        _one_line(_cli("ingest", str(src), "--out", str(ds), "--no-progress"), str(path), "is damaged")


def test_write_failure_of_an_annotation_part_names_it_and_what_is_kept(tmp_path):
    """A real OS write failure in this process (RLIMIT_FSIZE: the kernel fails writes past it with
    EFBIG, as a full disk does with ENOSPC): one line naming the part, the parts kept, the fix."""
    import resource

    import pyarrow as pa

    from bigasp.errors import DataError
    from bigasp.store import annotations

    def part(seq: int, n: int) -> Path:
        table = pa.table(
            {"id": [f"{k:064x}" for k in range(n)], "tags": [f"tag {k} " * 40 for k in range(n)]}
        )
        return annotations.write_part(
            tmp_path, "tags", "m1", table, session="s", rank=0, seq=seq, provenance={}
        )

    first = part(1, 2)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(DataError) as err:
            part(2, 400)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    msg = str(err.value)
    path = annotations.stage_dir(tmp_path, "tags", "m1") / annotations.part_name("s", 0, 2)
    assert msg.startswith(
        f"writing {path} failed (File too large); the tags parts written before it (1 by this run)"
    )
    assert "no partial file is left" in msg and "run the same command again" in msg
    assert annotations.list_parts(tmp_path, "tags", "m1") == [first]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["executable", "python -m"])
def test_an_error_while_pyarrow_reads_never_aborts_the_exit(encoded, tmp_path, launch):
    """pyarrow's reader threads, still reading a truncated index through a Python file object when
    the command ends, used to abort the process at interpreter teardown (SIGABRT, "terminate
    called without an active exception") in about 4 runs of 10 here: the command's own exit
    status (2, one line) must be what the shell sees, every time."""
    import sys

    _, original = encoded
    ds = _copy(original, tmp_path / "ds")
    _truncate(sorted((ds / layout.INDEX_DIR).glob("*.parquet"))[1])
    cmd = [str(BIGASP)] if launch == "executable" else [sys.executable, "-m", "bigasp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(6):
        res = subprocess.run([*cmd, "encode", str(ds), "--vae", "tiny", "--num-workers", "0", "--no-progress"],
                             capture_output=True, text=True, timeout=180, env=env)  # fmt: skip
        assert "terminate called" not in res.stderr, res.stderr
        _one_line(res, "is damaged")
