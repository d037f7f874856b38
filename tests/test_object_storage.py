"""Datasets on object storage, against a real S3 API server (moto in server mode) on 127.0.0.1.

Covers: encode writes shards and index objects straight to s3://, a hard-killed encoder (dies
between a shard's PUT and its index's) resumes to the same latents as a local encode; training
from s3:// with a SIGTERM cut and resume is bitwise the uninterrupted local run; the prefetcher
caches exactly the records of the next planned batches; the cache stays under its size limit
(LRU); a corrupt object is retried (and recovers when it is fixed meanwhile), a missing or
still-corrupt one is reported naming the shard and record.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigasp.buckets import BucketConfig
from bigasp.errors import DataError
from bigasp.prep import encode as enc
from bigasp.prep.config import EncodeConfig, IngestConfig
from bigasp.prep.ingest import ingest
from bigasp.store import LatentDataset, layout
from bigasp.store.cache import RecordCache
from bigasp.train.data import DataConfig, TrainLoader, open_dataset
from bigasp.train.synthetic import write_synthetic_latent_dataset
from bigasp.train.trainer import train
from s3_helpers import LOCAL_S3_ENV
from train_helpers import free_port, make_cfg, weights

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

BUCKET = "bigasp-test"
TINY = BucketConfig(step=16, min_area=48 * 64, max_area=64 * 64)
SRC = Path(__file__).parents[1] / "src"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port; yields the fsspec storage_options that reach it."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in LOCAL_S3_ENV.items():
            mp.setenv(k, v)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        opts = {"endpoint_url": f"http://{host}:{port}", "use_listings_cache": False}
        s3fs.S3FileSystem(**opts).mkdir(BUCKET)
        try:
            yield opts
        finally:
            server.stop()


def fs_of(opts):
    return s3fs.S3FileSystem(**opts)


def upload(local: Path, url: str, opts) -> None:
    fs_of(opts).put(str(local), url.removeprefix("s3://"), recursive=True)


# ---------------------------------------------------------------------------------------------
# encode


def _images(d: Path) -> Path:
    src = d / "src"
    src.mkdir(parents=True)
    sizes = [(120, 90), (90, 120), (100, 100), (130, 80), (64, 48), (80, 130)]
    for k, (w, h) in enumerate(sizes):
        rng = np.random.default_rng(k)
        small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(src / f"im{k}.jpg")
    ingest([src], d / "ds", IngestConfig(buckets=TINY, progress=False))
    return d / "ds"


def _ecfg(opts=None, **kw) -> EncodeConfig:
    base = dict(vae="tiny", num_workers=0, batch_size=2, progress=False, shard_size=2)
    return EncodeConfig(**{**base, **kw}, storage_options=opts or {})


KILL_AFTER_SECOND_SHARD = """
import os, sys
from bigasp.store import shard
from bigasp.prep import encode as enc
from bigasp.prep.config import EncodeConfig
real, n = shard.ShardWriter.close, [0]
def close(self):
    n[0] += 1
    if n[0] == 2:  # die like kill -9 once the shard object is uploaded, before its index object is
        self.fs.pipe_file = lambda *a, **k: os._exit(9)
    return real(self)
shard.ShardWriter.close = close
opts = {"endpoint_url": sys.argv[2], "use_listings_cache": False}
enc.encode(sys.argv[1], EncodeConfig(vae="tiny", num_workers=0, batch_size=2, progress=False, shard_size=2,
                                      storage_options=opts))
"""


def test_encode_to_s3_survives_a_kill_and_matches_local(tmp_path, s3):
    ds = _images(tmp_path)
    url = f"s3://{BUCKET}/enc"
    fs = fs_of(s3)
    for name in (layout.DATASET_JSON, layout.MANIFEST):
        fs.put_file(str(ds / name), f"{BUCKET}/enc/{name}")
    (tmp_path / "staging").mkdir()  # where the killed encoder's local staging copy stays behind
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "staging")}
    r = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_SECOND_SHARD, url, s3["endpoint_url"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 9, r.stderr[-2000:]
    shards = fs.glob(f"{BUCKET}/enc/{layout.SHARDS_DIR}/*/*")
    indexes = fs.glob(f"{BUCKET}/enc/{layout.INDEX_DIR}/*")
    assert len(shards) == 2 and len(indexes) == 1  # the second shard has no index yet: invisible
    visible = len(LatentDataset(url, storage_options=s3, cache_dir=tmp_path / "c"))
    assert visible > 0

    s = enc.encode(url, _ecfg(s3))  # resumes: indexes the orphan shard from its footer, encodes the rest
    assert s.skipped > visible and s.encoded > 0  # the orphan shard's latents are kept, not redone
    remote = LatentDataset(url, storage_options=s3, cache_dir=tmp_path / "c")
    local_s = enc.encode(ds, _ecfg())
    local = LatentDataset(str(ds))
    assert s.skipped + s.encoded == local_s.encoded == len(local) == len(remote)
    assert remote.table.column("id").to_pylist() == local.table.column("id").to_pylist()
    for i in range(len(local)):  # keyed crops and noise: the same latents whichever store and run
        assert torch.equal(remote.read_latent(i), local.read_latent(i))
        assert remote.table["crop_top"][i] == local.table["crop_top"][i]
    assert remote.verify() == []


# ---------------------------------------------------------------------------------------------
# train


@pytest.fixture(scope="module")
def s3_data(tmp_path_factory, s3) -> tuple[Path, str]:
    local = write_synthetic_latent_dataset(tmp_path_factory.mktemp("data") / "ds", n=12, seed=0)
    url = f"s3://{BUCKET}/train"
    upload(local, url, s3)
    return local, url


class Preempting:
    """The dataset, sending SIGTERM to this process at its n-th latent read (a preemption)."""

    def __init__(self, ds, at: int):
        self.ds, self.at, self.reads = ds, at, 0

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def __len__(self) -> int:
        return len(self.ds)

    def read_latent(self, i: int, variant: int = 0):
        self.reads += 1
        if self.reads == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.ds.read_latent(i, variant)


def test_train_from_s3_resumes_bitwise_like_local(tmp_path, s3, s3_data):
    local, url = s3_data
    ref = train(make_cfg(tmp_path / "a", local))
    data = {"storage_options": s3, "cache_dir": str(tmp_path / "cache"), "prefetch_batches": 2}
    cut = make_cfg(tmp_path / "b", url, data=data)
    first = train(cut, dataset=Preempting(open_dataset(cut.data), at=6))
    assert first.stopped_by_signal and first.step == 2
    second = train(cut, resume="auto")
    assert second.step == ref.step == 4
    a, b = weights(ref.last_checkpoint), weights(second.last_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert any((tmp_path / "cache").rglob("*-*-*-*"))  # read through the local cache


def test_prefetch_caches_exactly_the_next_planned_records(tmp_path, s3, s3_data):
    _, url = s3_data
    cfg = DataConfig(
        dataset=url,
        storage_options=s3,
        cache_dir=str(tmp_path / "cache"),
        prefetch_batches=2,
        device_batch_size=2,
        num_workers=0,
        validation_size=0,
        stable_size=0,
    )
    ds = open_dataset(cfg)
    loader = TrainLoader(ds, cfg)
    it = iter(loader)
    first = next(it)
    items = loader._items(loader.plan(0), 0)
    want = {ds._cache_key(ds.rec(int(r))) for j in range(3) for r in items[j].rows}  # batch 0 + 2 ahead
    deadline = time.monotonic() + 300  # a condition, not a time: only a hung prefetcher reaches this
    while {p.name for p in ds.cache.dir.iterdir()} != want and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {p.name for p in ds.cache.dir.iterdir()} == want
    assert first.indices.tolist() == items[0].rows.tolist()
    it.close()


def test_cache_evicts_least_recently_used(tmp_path):
    cache = RecordCache(tmp_path, "s3://b/ds", max_bytes=3000)
    for k in range(3):
        cache.put(f"k{k}", bytes(1000))
    time.sleep(0.01)
    os.utime(cache.dir / "k1", (0, 0))  # k1 least recently used
    os.utime(cache.dir / "k0", (1, 1))
    assert cache.get("k2") is not None
    cache.put("k3", bytes(1000))  # over the limit: evict down to 90% -> the two oldest go
    assert sorted(p.name for p in cache.dir.iterdir()) == ["k2", "k3"]
    assert cache.size() <= 3000


# ---------------------------------------------------------------------------------------------
# corruption


def test_corrupt_object_is_retried_and_missing_one_named(tmp_path, s3, s3_data):
    local, _ = s3_data
    url = f"s3://{BUCKET}/corrupt"
    upload(local, url, s3)
    fs = fs_of(s3)
    ds = LatentDataset(url, storage_options=s3, cache_dir=tmp_path / "c", retries=3, retry_wait=0.2)
    shard = f"{BUCKET}/corrupt/{ds.shards[0]}"
    good = fs.cat_file(shard)
    i = 5
    off = int(ds._offset[i])
    bad = bytearray(good)
    bad[off + 3] ^= 0xFF
    fs.pipe_file(shard, bytes(bad))
    # a transiently corrupt object: fixed while the reader is retrying -> the read succeeds
    fixer = threading.Timer(0.1, lambda: fs.pipe_file(shard, good))
    fixer.start()
    expected = LatentDataset(str(local)).read_latent(i)
    assert torch.equal(ds.read_latent(i), expected)
    fixer.join()
    # a damaged cache entry is dropped and fetched again, not served
    entry = ds.cache.dir / ds._cache_key(i)
    entry.write_bytes(b"\0" * entry.stat().st_size)
    assert torch.equal(ds.read_latent(i), expected)
    # still corrupt after the retries: one error naming shard and record
    fs.pipe_file(shard, bytes(bad))
    fresh = LatentDataset(url, storage_options=s3, cache_dir=tmp_path / "c2", retries=1, retry_wait=0)
    with pytest.raises(DataError, match=rf"{ds.shards[0]} record {int(ds._record[i])}: checksum mismatch"):
        fresh.read_latent(i)
    # a missing object
    fs.rm_file(shard)
    with pytest.raises(
        DataError, match=rf"{ds.shards[0]} record 0: the shard is listed in the latent index but missing"
    ):
        fresh.read_latent(0)


def test_bench_load_from_a_bucket_reports_cold_and_warm(tmp_path, s3):
    """With a DataLoader worker process: the forked worker makes its own S3 client."""
    from bigasp.bench.load import run_load_bench

    r = run_load_bench(
        latent=(8, 8), images=32, batch=4, workers=1, batches=4, warmup=0, seed=0, command="test",
        url=f"s3://{BUCKET}/bench", storage_options=s3, prefetch=2,
    )  # fmt: skip
    m = r.metrics
    assert m["samples"] == 16 and m["cold_samples_per_s"] > 0 and m["warm_samples_per_s"] > 0
    assert m["cache_bytes"] >= 16 * m["latent_bytes"]  # every latent read went through the cache
    assert not fs_of(s3).glob(f"{BUCKET}/bench/*")  # the uploaded store is removed afterwards


def test_local_s3_server_of_the_bench_delays_every_request(s3):
    from bigasp.bench.s3server import local_s3

    with local_s3(latency_ms=80) as endpoint:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False, skip_instance_cache=True)
        fs.mkdir("lat")
        fs.pipe_file("lat/a", b"x")
        t = time.perf_counter()
        assert fs.cat_file("lat/a") == b"x"
        assert time.perf_counter() - t >= 0.08


def test_streaming_first_pass_from_a_bucket_equals_the_local_one(tmp_path, s3):
    """The encoder publishes index objects one at a time into the bucket while the run streams:
    the waves, batches and latents are those of the same publication on a local disk."""
    import shutil

    from bigasp.train.stream import StreamingLoader

    local = write_synthetic_latent_dataset(tmp_path / "ds", n=24, seed=4, shard_size=4)
    names = sorted(p.name for p in (local / layout.INDEX_DIR).glob("*.parquet"))
    held = tmp_path / "held"
    shutil.copytree(local / layout.INDEX_DIR, held)
    url = f"s3://{BUCKET}/streaming"
    upload(local, url, s3)
    fs = fs_of(s3)
    for n in names:
        fs.rm(f"{BUCKET}/streaming/{layout.INDEX_DIR}/{n}")
        (local / layout.INDEX_DIR / n).unlink()

    def run(dataset_url: str, publish) -> tuple[list, list]:
        count = [0]

        def exchange(decision):
            if decision[0] == "wait":
                publish(names[count[0]])
                count[0] += 1
            return decision

        cfg = DataConfig(
            dataset=dataset_url, seed=2, device_batch_size=2, num_workers=0, validation_size=2, stable_size=2,
            stream=True, stream_poll_s=0.01, storage_options=s3 if dataset_url.startswith("s3") else {},
            cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip
        loader = StreamingLoader(open_dataset(cfg, streaming=True), cfg, exchange=exchange)
        out = []
        for b in loader:
            if b.epoch > 0:
                break
            out.append(b)
        return out, loader.waves

    remote, remote_waves = run(
        url, lambda n: fs.put(str(held / n), f"{BUCKET}/streaming/{layout.INDEX_DIR}/{n}")
    )
    here, local_waves = run(str(local), lambda n: shutil.copy(held / n, local / layout.INDEX_DIR / n))
    assert remote_waves == local_waves and len(remote_waves) == len(names)
    assert len(remote) == len(here) > 0
    for a, b in zip(remote, here, strict=True):
        assert (
            torch.equal(a.indices, b.indices) and a.prompts == b.prompts and torch.equal(a.latents, b.latents)
        )


# ---------------------------------------------------------------------------------------------
# what failed, and where: the installed `bigasp` against the real server


def test_missing_bucket_unreachable_endpoint_and_no_credentials_are_told_apart(s3, tmp_path):
    """Each is one line naming what failed (bucket, endpoint, credentials) and where; a missing
    dataset in an existing bucket is still "not a bigasp dataset"."""
    exe = Path(sys.executable).with_name("bigasp")
    endpoint = s3["endpoint_url"]
    base = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "OMP_NUM_THREADS": "1"}

    def line(url: str, env: dict, *cmd: str) -> str:
        res = subprocess.run([str(exe), "dataset", *cmd, url], capture_output=True, text=True, env=env,
                             timeout=180)  # fmt: skip
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        return res.stderr.strip().splitlines()[-1]

    got = line("s3://no-such-bucket/ds", base, "info")
    assert got.startswith(
        f"error: s3://no-such-bucket/ds: bucket 'no-such-bucket' does not exist at {endpoint}"
    )
    got = line(f"s3://{BUCKET}/no-dataset", base, "verify")
    assert got.startswith(f"error: s3://{BUCKET}/no-dataset is not a bigasp dataset (dataset.json missing)")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    got = line(f"s3://{BUCKET}/ds", {**base, "AWS_ENDPOINT_URL": dead, "AWS_MAX_ATTEMPTS": "1"}, "info")
    assert got.startswith(f"error: s3://{BUCKET}/ds: cannot reach the object store at {dead}"), got
    bare = {k: v for k, v in base.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    got = line(f"s3://{BUCKET}/ds", {**bare, "AWS_EC2_METADATA_DISABLED": "true"}, "verify")
    assert got.startswith(f"error: s3://{BUCKET}/ds: no credentials for the object store at {endpoint}"), got
    assert "AWS_ACCESS_KEY_ID" in got
