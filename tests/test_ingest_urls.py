"""Ingest from object storage, against a real S3 API server on 127.0.0.1 (moto, with injectable
503 SlowDown replies): folders and webdataset tar shards at s3:// URLs give the same manifest as
the same files on disk, record URLs (+ member and byte range), reject bad input with a reason,
retry transient failures (counted), stop with one line on bad credentials or a missing bucket,
follow added / changed / removed objects on a re-run, and later stages re-read photos by URL.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bigasp.buckets import BucketConfig
from bigasp.errors import DataError
from bigasp.prep.config import IngestConfig
from bigasp.prep.images import Reject
from bigasp.prep.ingest import ingest, read_ingested
from bigasp.quality.images import manifest_ref
from bigasp.store import remote
from s3_helpers import LOCAL_S3_ENV

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
webdataset = pytest.importorskip("webdataset")

BUCKET = "photos"
TINY = BucketConfig(step=16, min_area=48 * 64, max_area=64 * 64)


def jpeg(seed: int, w: int = 64, h: int = 64) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    """The bench's local S3 server (real HTTP S3 API) with a fault injector; yields (opts, faults)."""
    from bigasp.bench.s3server import Faults, local_s3

    faults = Faults()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in LOCAL_S3_ENV.items():
            mp.setenv(k, v)
        with local_s3(faults=faults) as endpoint:
            opts = {"endpoint_url": endpoint, "use_listings_cache": False}
            s3fs.S3FileSystem(**opts).mkdir(BUCKET)
            yield opts, faults
    remote.configure(None)


def fs_of(opts):
    return s3fs.S3FileSystem(**opts, skip_instance_cache=True)


def write_layout(d: Path) -> None:
    """A folder with sidecars and two webdataset shards (key.jpg + key.txt + key.json)."""
    (d / "folder" / "sub").mkdir(parents=True)
    (d / "folder" / "a.jpg").write_bytes(jpeg(1))
    (d / "folder" / "a.txt").write_text("a caption\n")
    (d / "folder" / "sub" / "b.jpg").write_bytes(jpeg(2))
    (d / "folder" / "sub" / "b.json").write_text(json.dumps({"caption": "bee", "score": 5}))
    (d / "folder" / "bad.jpg").write_bytes(b"not an image at all")
    (d / "shards").mkdir()
    for s in range(2):
        with webdataset.TarWriter(str(d / "shards" / f"{s:05d}.tar")) as w:
            for k in range(3):
                i = 10 * s + k
                w.write({"__key__": f"{i:09d}", "jpg": jpeg(100 + i), "txt": f"photo {i}",
                         "json": {"url": f"http://example.com/{i}.jpg", "caption": f"photo {i}", "key": f"{i:09d}"}})  # fmt: skip


def cfg(opts, **kw) -> IngestConfig:
    return IngestConfig(buckets=TINY, progress=False, storage_options=opts, commit_every=2, **kw)


def table(root: Path, name: str = "manifest.parquet") -> list[dict]:
    return sorted(
        pq.read_table(root / name).to_pylist(), key=lambda r: r.get("id") or r.get("path") or r["url"]
    )


def local_path(url_path: str, prefix: str, local: Path) -> str:
    return str(local) + url_path[len(prefix) :]


@pytest.fixture(scope="module")
def uploaded(server, tmp_path_factory):
    opts, _ = server
    d = tmp_path_factory.mktemp("layout")
    write_layout(d)
    fs_of(opts).put(str(d) + "/", f"{BUCKET}/set1/", recursive=True)
    return d


def test_url_sources_give_the_local_manifest_with_urls_and_byte_ranges(server, uploaded, tmp_path):
    opts, _ = server
    base = f"s3://{BUCKET}/set1"
    s = ingest([f"{base}/folder/", f"{base}/shards/{{00000..00001}}.tar"], tmp_path / "url", cfg(opts))
    local = ingest(
        [uploaded / "folder", *sorted((uploaded / "shards").glob("*.tar"))], tmp_path / "loc", cfg(opts)
    )
    assert s.new == local.new == 8 and s.rejects == local.rejects and dict(s.rejects) == {"corrupt": 1}
    got, want = table(tmp_path / "url"), table(tmp_path / "loc")
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g["path"].startswith(base + "/")  # a URL, never a local temp path
        assert local_path(g["path"], base, uploaded) == w["path"]
        for col in ("tar_offset", "file_size", "width", "height", "captions", "score", "extra"):
            assert g[col] == w[col], col
    # tar members: URL::member and their byte range; one ranged read gives the exact bytes
    member = next(r for r in got if "::" in r["path"])
    url, name = member["path"].split("::")
    assert url.endswith(".tar") and name.endswith(".jpg")
    with tarfile.open(local_path(url, base, uploaded)) as tf:
        m = tf.getmember(name)
        assert (m.offset_data, m.size) == (member["tar_offset"], member["file_size"])
        want_bytes = tf.extractfile(m).read()
    remote.configure(opts)
    ref = manifest_ref(member["path"], member["tar_offset"], member["file_size"])
    assert read_ingested(ref, member["id"]) == want_bytes
    # every byte of the sources fetched exactly once: shards streamed once, folder objects once each
    assert s.fetched == sum(p.stat().st_size for p in uploaded.rglob("*") if p.is_file())


def test_bad_objects_are_rejects_and_access_problems_one_line(server, tmp_path):
    opts, _ = server
    fs = fs_of(opts)
    buf = io.BytesIO()
    with webdataset.TarWriter(buf) as w:
        for k in range(3):
            w.write({"__key__": f"k{k}", "jpg": jpeg(200 + k), "txt": f"t{k}"})
    whole = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        last = tf.getmember("k2.jpg")
    fs.pipe(f"{BUCKET}/bad/00000.tar", whole[: last.offset_data + last.size // 2])  # last image cut short
    # 00001.tar is missing from the range
    s = ingest([f"s3://{BUCKET}/bad/{{00000..00001}}.tar"], tmp_path / "ds", cfg(opts))
    rej = {r["path"]: r for r in table(tmp_path / "ds", "rejects.parquet")}
    assert rej[f"s3://{BUCKET}/bad/00001.tar"]["reason"] == "missing"
    assert any(
        p.startswith(f"s3://{BUCKET}/bad/00000.tar::") and r["reason"] == "truncated" for p, r in rej.items()
    )
    assert s.new == 2  # the members before the cut are kept
    with pytest.raises(DataError, match="s3://no-such-bucket/x/ cannot be listed"):
        ingest(["s3://no-such-bucket/x/"], tmp_path / "nb", cfg(opts))
    fs.pipe(f"{BUCKET}/one/a.jpg", jpeg(7))
    import moto.settings

    wrong = {**opts, "key": "AKIAWRONGKEY", "secret": "wrong"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks keys now
        with pytest.raises(remote.RemoteAccessError) as err:
            ingest([f"s3://{BUCKET}/one/"], tmp_path / "wrong", cfg(wrong))
    line = str(err.value)
    assert f"s3://{BUCKET}/one/" in line and "access denied" in line and "\n" not in line


def test_transient_failures_are_retried_and_counted(server, tmp_path):
    opts, faults = server
    fs_of(opts).pipe(f"{BUCKET}/flaky/a.jpg", jpeg(9))
    faults.slow_down = 3
    s = ingest([f"s3://{BUCKET}/flaky/"], tmp_path / "ds", cfg(opts))
    assert s.new == 1 and s.retries == faults.injected == 3


def test_rerun_follows_added_changed_and_removed_objects(server, tmp_path):
    opts, _ = server
    fs = fs_of(opts)
    pre = f"{BUCKET}/inc"
    fs.pipe(f"{pre}/a.jpg", jpeg(30))
    fs.pipe(f"{pre}/a.txt", b"first")
    fs.pipe(f"{pre}/b.jpg", jpeg(31))
    with webdataset.TarWriter(f"{tmp_path}/s.tar") as w:
        w.write({"__key__": "k", "jpg": jpeg(32), "txt": "in a shard"})
    fs.put(f"{tmp_path}/s.tar", f"{pre}-shards/00000.tar")
    srcs = [f"s3://{pre}/", f"s3://{pre}-shards/{{00000..00000}}.tar"]
    out = tmp_path / "ds"
    assert ingest(srcs, out, cfg(opts)).new == 3
    again = ingest(srcs, out, cfg(opts))
    assert (again.scanned, again.skipped, again.new, again.updated) == (3, 3, 0, 0)
    assert again.fetched == 0  # listed and HEADed only: the unchanged shard is not downloaded again
    fs.pipe(f"{pre}/a.txt", b"second")  # changed sidecar (new ETag)
    fs.rm(f"{pre}/b.jpg")  # removed
    fs.pipe(f"{pre}/c.jpg", jpeg(33))  # added
    s = ingest(srcs, out, cfg(opts))
    assert (s.new, s.updated, s.removed, s.skipped) == (1, 1, 1, 1)
    rows = {r["path"]: r for r in table(out)}
    assert rows[f"s3://{pre}/a.jpg"]["captions"] == ["second"]
    assert f"s3://{pre}/b.jpg" not in rows and f"s3://{pre}/c.jpg" in rows
    with webdataset.TarWriter(f"{tmp_path}/s.tar") as w:  # the shard rewritten: new ETag
        w.write({"__key__": "k", "jpg": jpeg(34), "txt": "in a shard"})
    fs.put(f"{tmp_path}/s.tar", f"{pre}-shards/00000.tar")
    s = ingest(srcs, out, cfg(opts))
    assert (s.updated, s.skipped, s.fetched > 0) == (1, 2, True)
    fs.rm(f"{pre}-shards/00000.tar")  # gone: its member is pruned, the shard itself a `missing` reject
    s = ingest(srcs, out, cfg(opts))
    assert s.removed == 1 and dict(s.rejects) == {"missing": 1}
    assert not any("::" in p for p in (r["path"] for r in table(out)))
    assert pq.read_table(out / "url_shards.parquet").num_rows == 0


def test_object_deleted_mid_run_is_a_missing_reject(server, tmp_path):
    """Listed, then deleted before its bytes are read: the scan and the read are ingest's own
    steps, run here one after the other with the deletion between them."""
    from bigasp.buckets import BucketSet
    from bigasp.prep.ingest import examine
    from bigasp.prep.sources import scan

    opts, _ = server
    fs = fs_of(opts)
    fs.pipe(f"{BUCKET}/mid/a.jpg", jpeg(41))
    fs.pipe(f"{BUCKET}/mid/b.jpg", jpeg(42))
    remote.configure(opts)
    items = list(scan([f"s3://{BUCKET}/mid/"]))
    fs.rm(f"{BUCKET}/mid/b.jpg")
    c = cfg(opts)
    got = [examine(it, c, BucketSet(TINY.buckets())) for it in items]
    assert [g[0] for g in got] == ["ok", "reject"]
    assert got[1][1]["reason"] == "missing" and got[1][1]["path"] == f"s3://{BUCKET}/mid/b.jpg"


def test_object_deleted_after_ingest_is_a_missing_reject_on_reread(server, tmp_path):
    opts, _ = server
    fs = fs_of(opts)
    fs.pipe(f"{BUCKET}/gone/a.jpg", jpeg(40))
    ingest([f"s3://{BUCKET}/gone/"], tmp_path / "ds", cfg(opts))
    (row,) = table(tmp_path / "ds")
    fs.rm(f"{BUCKET}/gone/a.jpg")
    with pytest.raises(Reject) as r:
        read_ingested(manifest_ref(row["path"], row["tar_offset"], row["file_size"]), row["id"])
    assert r.value.reason == "missing"


RANK_SCRIPT = """
import json, sys
from bigasp.buckets import BucketConfig
from bigasp.prep.config import IngestConfig
from bigasp.prep.ingest import ingest
opts, out, srcs = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3:]
cfg = IngestConfig(buckets=BucketConfig(step=16, min_area=48 * 64, max_area=64 * 64), progress=False,
                   storage_options=opts, commit_every=2)
print("SUMMARY", json.dumps(ingest(srcs, out, cfg).to_json()))
"""


def launch_ranks(
    opts,
    outs: list[Path | str],
    srcs: list[str],
    hold: dict[int, str] | None = None,
    work: list[Path] | None = None,
):
    """One process per rank, as torchrun starts them, each with its own --out folder (no shared disk),
    or, for --out at a URL, its own working-copy folder (`work`, as $BIGASP_WORK_DIR)."""
    import subprocess
    import sys

    from train_helpers import free_port

    port = free_port()
    procs = []
    for rank, out in enumerate(outs):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1",
               "RANK": str(rank), "WORLD_SIZE": str(len(outs)), "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        env.pop("BIGASP_HOLD", None)
        if work:
            env["BIGASP_WORK_DIR"] = str(work[rank])
        if hold and rank in hold:
            env["BIGASP_HOLD"] = hold[rank]
        cmd = [sys.executable, "-c", RANK_SCRIPT, json.dumps(opts), str(out), *srcs]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def finish(procs) -> dict:
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, e[-3000:]
    return json.loads(outs[0][0].split("SUMMARY ", 1)[1])


def test_two_ranks_equal_one_and_resume_after_a_kill(server, uploaded, tmp_path):
    import signal

    opts, _ = server
    base = f"s3://{BUCKET}/set1"
    srcs = [f"{base}/shards/{{00000..00001}}.tar", f"{base}/folder/"]
    one = ingest(srcs, tmp_path / "one", cfg(opts))
    # rank 1 is killed after its first committed part, rank 0 wherever it is then
    procs = launch_ranks(opts, [tmp_path / "r0", tmp_path / "r1"], srcs, hold={1: "ingest.committed"})
    r1 = procs[1]
    for line in r1.stderr:
        if "holding at ingest.committed" in line:
            break
    for p in (r1, procs[0]):
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    left = list((tmp_path / "r1" / "parts" / "rank-00001").glob("*.parquet"))
    assert left  # rank 1's committed part stayed on its own disk
    total = finish(launch_ranks(opts, [tmp_path / "r0", tmp_path / "r1"], list(reversed(srcs))))
    assert total["skipped"] >= 2  # what rank 1 committed before the kill was not examined again
    assert total["new"] + total["skipped"] + sum(total["rejects"].values()) == one.scanned
    assert table(tmp_path / "r0") == table(tmp_path / "one")

    assert table(tmp_path / "r0", "rejects.parquet") == table(tmp_path / "one", "rejects.parquet")
    shards = table(tmp_path / "one", "url_shards.parquet")  # both shards read whole, by whichever rank
    assert len(shards) == 2 and table(tmp_path / "r0", "url_shards.parquet") == shards
    assert not list((tmp_path / "r1" / "parts").rglob("*.parquet"))  # shipped, then removed
    assert not (tmp_path / "r1" / "manifest.parquet").exists()  # only rank 0 holds the dataset


def test_two_ranks_ingest_to_a_url_as_one_rank_does(server, uploaded, tmp_path):
    """Two ranks, each with its own working copy, ingest into s3://: rank 0 alone writes the URL,
    and its manifest is the one-rank manifest."""
    opts, _ = server
    base = f"s3://{BUCKET}/set1"
    srcs = [f"{base}/shards/{{00000..00001}}.tar", f"{base}/folder/"]
    ingest(srcs, tmp_path / "one", cfg(opts))
    url = f"s3://{BUCKET}/ranked/ds"
    total = finish(launch_ranks(opts, [url, url], srcs, work=[tmp_path / "w0", tmp_path / "w1"]))
    assert total["total_images"] == len(table(tmp_path / "one"))
    with fs_of(opts).open(f"{BUCKET}/ranked/ds/manifest.parquet", "rb") as f:
        got = sorted(pq.read_table(f).to_pylist(), key=lambda r: r["id"])
    assert got == table(tmp_path / "one")
    assert not list((tmp_path / "w1").rglob("manifest.parquet"))  # only rank 0 holds the dataset


def test_bucket_photos_to_training_with_only_a_local_cache(server, tmp_path):
    """URL photos -> ingest -> annotate (tiny tagger) -> merge -> encode to s3:// -> train from
    s3:// for a few steps: the photos and the dataset live in the bucket; the only local files
    are this machine's dataset working copy and caches."""
    from bigasp.annotate import tiny
    from bigasp.annotate.config import AnnotateConfig, MergeConfig
    from bigasp.annotate.merge import merge
    from bigasp.annotate.run import annotate
    from bigasp.prep import encode as enc
    from bigasp.prep.config import EncodeConfig
    from bigasp.store import LatentDataset, layout
    from bigasp.train.trainer import train
    from train_helpers import make_cfg

    opts, _ = server
    fs = fs_of(opts)
    with webdataset.TarWriter(str(tmp_path / "s.tar")) as w:
        for k in range(4):
            w.write({"__key__": f"{k:09d}", "jpg": jpeg(300 + k, 64, 48 + 16 * (k % 2)), "txt": f"photo {k}"})
    fs.put(str(tmp_path / "s.tar"), f"{BUCKET}/chain/shards/00000.tar")
    fs.pipe(f"{BUCKET}/chain/loose/a.jpg", jpeg(310, 48, 64))
    url = f"s3://{BUCKET}/chain/dataset"  # the dataset's only home; each step works in a local copy
    srcs = [f"s3://{BUCKET}/chain/shards/{{00000..00000}}.tar", f"s3://{BUCKET}/chain/loose/"]
    s = ingest(srcs, url, cfg(opts, work_dir=str(tmp_path / "cache" / "ingest")))
    assert s.new == 5
    tagger = tiny.onnx_tagger(tmp_path / "cache" / "joytag-tiny", kind="joytag")
    acfg = AnnotateConfig(stages=["tags"], tags={"model": str(tagger)}, device="cpu", num_workers=0, batch_size=4,
                          progress=False, storage_options=opts, work_dir=str(tmp_path / "cache" / "annotate"))  # fmt: skip
    a = annotate(url, acfg)
    assert a.stages["tags"].done == 5
    again = annotate(url, acfg.model_copy(update={"work_dir": str(tmp_path / "cache" / "annotate2")}))
    assert (again.stages["tags"].done, again.stages["tags"].skipped) == (
        0,
        5,
    )  # the URL's parts count as done
    # merged on "another machine": a fresh working copy sees the parts annotate wrote to the URL
    merge(url, MergeConfig(storage_options=opts, work_dir=str(tmp_path / "cache" / "merge")))
    names = [n.split("/chain/dataset/", 1)[1] for n in fs.find(f"{BUCKET}/chain/dataset")]
    assert {layout.DATASET_JSON, layout.MANIFEST, "sources.parquet", "url_shards.parquet"} <= set(names)
    assert not [n for n in names if n.startswith("parts/") or "lock" in n or "/." in "/" + n]
    with fs.open(f"{BUCKET}/chain/dataset/{layout.MANIFEST}", "rb") as f:
        assert all(pq.read_table(f).column("tags").to_pylist())  # the merged tags are in the URL's manifest
    # a later ingest from a fresh working copy rebuilds the manifest and keeps the merge
    assert ingest(srcs, url, cfg(opts, work_dir=str(tmp_path / "cache" / "ingest2"))).skipped == 5
    with fs.open(f"{BUCKET}/chain/dataset/{layout.MANIFEST}", "rb") as f:
        assert all(pq.read_table(f).column("tags").to_pylist())
    e = enc.encode(
        url, EncodeConfig(vae="tiny", num_workers=0, batch_size=2, progress=False, storage_options=opts)
    )
    assert e.encoded == 5 and not e.rejects
    assert len(LatentDataset(url, storage_options=opts, cache_dir=tmp_path / "cache" / "latents")) == 5
    data = {"storage_options": opts, "cache_dir": str(tmp_path / "cache" / "latents"), "validation_size": 1,
            "stable_size": 1}  # fmt: skip
    run = train(make_cfg(tmp_path / "cache" / "run", url, data=data, train={"max_samples": 8}))
    assert run.step == 2


def test_ingest_out_url_reruns_incrementally_from_any_working_copy(server, tmp_path, capsys):
    """A second `ingest --out URL` skips everything, on this machine and from a fresh working copy
    (another machine); a bad dataset URL is one line."""
    from bigasp.cli import main

    opts, _ = server
    fs = fs_of(opts)
    for k in range(3):
        fs.pipe(f"{BUCKET}/inc/photos/{k}.jpg", jpeg(400 + k))
    src, url = f"s3://{BUCKET}/inc/photos/", f"s3://{BUCKET}/inc/ds"
    first = ingest([src], url, cfg(opts, work_dir=str(tmp_path / "a")))
    assert first.new == 3
    again = ingest([src], url, cfg(opts, work_dir=str(tmp_path / "a")))
    other = ingest([src], url, cfg(opts, work_dir=str(tmp_path / "b")))
    for s in (again, other):
        assert (s.new, s.skipped, s.total_images) == (0, 3, 3)
    fs.pipe(f"{BUCKET}/inc/photos/3.jpg", jpeg(404))  # a new photo: the rerun from the first copy adds it
    more = ingest([src], url, cfg(opts, work_dir=str(tmp_path / "a")))
    assert (more.new, more.skipped, more.total_images) == (1, 3, 4)
    with fs.open(f"{BUCKET}/inc/ds/manifest.parquet", "rb") as f:
        assert pq.read_table(f).num_rows == 4
    # a run killed after it folded into the working copy but before it wrote the URL: the plain
    # local ingest below is that state; the rerun keeps the newer local tables and writes them
    fs.pipe(f"{BUCKET}/inc/photos/4.jpg", jpeg(405))
    assert ingest([src], tmp_path / "a", cfg(opts)).new == 1
    resumed = ingest([src], url, cfg(opts, work_dir=str(tmp_path / "a")))
    assert (resumed.new, resumed.skipped, resumed.total_images) == (0, 5, 5)
    with fs.open(f"{BUCKET}/inc/ds/manifest.parquet", "rb") as f:
        assert pq.read_table(f).num_rows == 5
    with pytest.raises(SystemExit) as stop:
        main(["ingest", src, "--out", "s3://no-such-bucket/ds", "--work", str(tmp_path / "nb"), "--no-progress",
              "--set", f"storage_options.endpoint_url={opts['endpoint_url']}"])  # fmt: skip
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s3://no-such-bucket/ds cannot be reached" in err[0], err


def test_cli_reads_urls_with_the_endpoint_from_the_environment(server, tmp_path, capsys, monkeypatch):
    from bigasp.cli import main

    opts, _ = server
    fs_of(opts).pipe(f"{BUCKET}/cli/a.jpg", jpeg(50))
    monkeypatch.setenv("AWS_ENDPOINT_URL", opts["endpoint_url"])  # no storage_options: the usual variables
    remote.configure(None)
    main(["ingest", f"s3://{BUCKET}/cli/", "--out", str(tmp_path / "ds"), "--no-progress", "--json",
          "--set", "buckets.step=16", "--set", "buckets.min_area=3072", "--set", "buckets.max_area=4096"])  # fmt: skip
    assert json.loads(capsys.readouterr().out)["new"] == 1
    with pytest.raises(SystemExit) as stop:
        main(["ingest", "s3://no-such-bucket/photos/", "--out", str(tmp_path / "nb")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s3://no-such-bucket/photos/ cannot be listed" in err[0]


def test_parquet_at_a_url_gives_the_local_rows_and_reads_them_back_by_range(server, tmp_path):
    """A Parquet file with an image column at s3://, alone and inside a prefix: the same ids, rows
    and captions as the same file on disk, recorded as `URL::column[R]`, and re-read by URL."""
    import pyarrow as pa

    opts, _ = server
    images = [jpeg(300 + k) for k in range(5)]
    t = pa.table({"image": pa.array(images, pa.binary()), "caption": [f"row {k}" for k in range(5)]})
    local = tmp_path / "pq"
    local.mkdir()
    pq.write_table(t, local / "photos.parquet", row_group_size=2)
    fs_of(opts).put(str(local / "photos.parquet"), f"{BUCKET}/pq/photos.parquet")
    url = f"s3://{BUCKET}/pq/photos.parquet"
    ingest([local / "photos.parquet"], tmp_path / "disk", cfg(opts))
    ingest([url], tmp_path / "one", cfg(opts))
    ingest([f"s3://{BUCKET}/pq/"], tmp_path / "prefix", cfg(opts))
    disk = table(tmp_path / "disk")
    for name in ("one", "prefix"):
        rows = table(tmp_path / name)
        assert [r["id"] for r in rows] == [r["id"] for r in disk] and len(rows) == 5
        assert [r["captions"] for r in rows] == [r["captions"] for r in disk] and disk[0]["captions"]
        assert [r["row"] for r in rows] == [r["row"] for r in disk]
        for r in rows:
            assert r["path"] == f"{url}::image[{r['row']}]", r["path"]
            ref = manifest_ref(r["path"], r["tar_offset"], r["file_size"], r["row"])
            assert read_ingested(ref, r["id"]) == images[r["row"]]


# --- annotate / encode of URL photos: ranks, and a stopped encode resumed ------------------------


@pytest.fixture(scope="module")
def url_dataset(server, tmp_path_factory) -> Path:
    """A local dataset whose 8 photos live in the bucket (two tar shards and a folder; three bucket
    shapes), so annotate and encode fetch every photo by a ranged GET."""
    opts, _ = server
    d = tmp_path_factory.mktemp("urlds")
    sizes = [(64, 48), (48, 64), (64, 64)]
    for s in range(2):
        with webdataset.TarWriter(str(d / f"{s:05d}.tar")) as w:
            for k in range(3):
                i = 3 * s + k
                w.write({"__key__": f"{i:09d}", "jpg": jpeg(500 + i, *sizes[i % 3]), "txt": f"photo {i}"})
        fs_of(opts).put(str(d / f"{s:05d}.tar"), f"{BUCKET}/ranks/shards/{s:05d}.tar")
    fs_of(opts).pipe(f"{BUCKET}/ranks/loose/a.jpg", jpeg(520, 48, 64))
    fs_of(opts).pipe(f"{BUCKET}/ranks/loose/b.jpg", jpeg(521, 64, 48))
    srcs = [f"s3://{BUCKET}/ranks/shards/{{00000..00001}}.tar", f"s3://{BUCKET}/ranks/loose/"]
    assert ingest(srcs, d / "ds", cfg(opts)).new == 8
    assert all(r["path"].startswith(f"s3://{BUCKET}/ranks/") for r in table(d / "ds"))
    return d / "ds"


def copy_dataset(ds: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(ds, to)
    return to


def url_env(opts) -> dict[str, str]:
    """A child's environment: the worktree's code, and the bucket's endpoint and keys as the usual
    AWS_* variables (the CLI is given no storage_options)."""
    env = {**os.environ, **LOCAL_S3_ENV, "AWS_ENDPOINT_URL": opts["endpoint_url"],
           "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("BIGASP_HOLD", None)
    return env


def torchrun(opts, *args: str):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bigasp",
           *args, "--no-progress", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, env=url_env(opts), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert '"world_size": 2' in proc.stdout, proc.stdout[-2000:]
    return proc


def latent_cols() -> list[str]:
    """The columns that say which image a latent is and how it was cut: id + bucket, size, crop."""
    from bigasp.store.reader import INDEX_COLUMNS

    return ["id", *INDEX_COLUMNS[INDEX_COLUMNS.index("bucket_height") :]]


def assert_same_latents(a: Path | str, b: Path | str) -> None:
    from bigasp.store import LatentDataset

    d1, d2 = LatentDataset(str(a)), LatentDataset(str(b))
    assert len(d1) == len(d2) == 8
    assert d1.table.select(latent_cols()).equals(d2.table.select(latent_cols()))
    for i in range(len(d1)):
        # same photo, crop and noise; only the conv kernels' summation order may differ with the batch
        np.testing.assert_allclose(d1.read_latent(i).numpy(), d2.read_latent(i).numpy(), rtol=2e-3, atol=2e-4)


def test_annotate_and_encode_of_url_photos_two_ranks_equal_one(server, url_dataset, tmp_path):
    """torchrun, 2 ranks, photos at URLs and the endpoint only in the environment: each rank fetches
    its share by ranged GETs and writes its own parts / shards; the result is the one-process one."""
    from bigasp.annotate import tiny
    from bigasp.annotate.config import AnnotateConfig
    from bigasp.annotate.run import annotate
    from bigasp.prep import encode as enc
    from bigasp.prep.config import EncodeConfig
    from bigasp.store import annotations as store
    from bigasp.store import layout
    from bigasp.store.manifest import read_index

    opts, faults = server
    assert faults.slow_down == 0
    one = copy_dataset(url_dataset, tmp_path / "one")
    two = copy_dataset(url_dataset, tmp_path / "two")
    tagger = tiny.onnx_tagger(tmp_path / "joytag-tiny", kind="joytag")
    acfg = AnnotateConfig(stages=["tags"], tags={"model": str(tagger)}, device="cpu", num_workers=0, batch_size=2,
                          part_size=2, progress=False, storage_options=opts)  # fmt: skip
    assert annotate(one, acfg).stages["tags"].done == 8
    proc = torchrun(opts, "annotate", str(two), "--stage", "tags", "--tags-model", str(tagger), "--device", "cpu",
                    "--num-workers", "0", "--batch-size", "2", "--part-size", "2")  # fmt: skip
    stages = json.loads(proc.stdout)["stages"]["tags"]
    assert (stages["done"], sum(stages["failed"].values())) == (8, 0), proc.stdout
    ranks = {p.name.split("-r")[1][:5] for p in (two / "annotations").rglob("*.parquet")}
    assert ranks == {"00000", "00001"}  # both ranks fetched photos and wrote their own parts
    a, b = store.read_stage(one, "tags"), store.read_stage(two, "tags")
    assert a.num_rows == 8 and a.column_names == b.column_names
    for col in a.column_names:
        assert a.column(col).equals(b.column(col)), col

    s = enc.encode(one, EncodeConfig(vae="tiny", num_workers=0, batch_size=2, shard_size=2, progress=False,
                                     storage_options=opts))  # fmt: skip
    assert s.encoded == 8 and not s.rejects
    proc = torchrun(opts, "encode", str(two), "--vae", "tiny", "--num-workers", "0", "--batch-size", "2",
                    "--shard-size", "2")  # fmt: skip
    summary = json.loads(proc.stdout)
    assert (summary["encoded"], summary["rejects"]) == (8, {}), proc.stdout
    ranks = {p.name.split("-r")[1][:5] for p in (two / layout.SHARDS_DIR).rglob("*.bls")}
    assert ranks == {"00000", "00001"}  # both ranks wrote their own shards
    assert_same_latents(one, two)
    assert len(read_index(*layout.url_to_fs(str(two)))) == 8  # each photo encoded once, by one rank


def test_encode_of_url_photos_killed_and_rerun_loses_and_repeats_nothing(server, url_dataset, tmp_path):
    """`bigasp encode` on URL photos, Ctrl-C'd after its 3rd batch (3 latents committed), then
    re-run and SIGKILLed after 2 more batches, then re-run to the end: the dataset is the
    uninterrupted encode's, and each run encoded only what the runs before had not committed."""
    import signal
    import subprocess
    import sys

    from bigasp.prep import encode as enc
    from bigasp.prep.config import EncodeConfig
    from bigasp.store import LatentDataset, layout
    from bigasp.store.shard import list_shards
    from hold_helpers import start_held

    opts, faults = server
    assert faults.slow_down == 0
    whole = copy_dataset(url_dataset, tmp_path / "whole")
    s = enc.encode(whole, EncodeConfig(vae="tiny", num_workers=0, batch_size=1, shard_size=1, progress=False,
                                       storage_options=opts))  # fmt: skip
    assert s.encoded == 8
    ds = copy_dataset(url_dataset, tmp_path / "ds")
    cmd = [sys.executable, "-m", "bigasp", "encode", str(ds), "--vae", "tiny", "--num-workers", "0",
           "--batch-size", "1", "--shard-size", "1", "--no-progress", "--json"]  # fmt: skip

    proc, _ = start_held(cmd, "encode.batch:3", env=url_env(opts))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "3 latent(s) committed" in err.strip().splitlines()[-1], err[-2000:]
    assert len(LatentDataset(str(ds))) == 3

    proc, _ = start_held(cmd, "encode.batch:2", env=url_env(opts))  # 2 more batches handed to the writer
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # what the writer thread had committed when the kill came: whole shards (one latent each; a
    # shard is renamed into place complete, then indexed: a kill between the two leaves a shard the
    # next encode indexes, never encodes again)
    killed = len(list_shards(*layout.url_to_fs(str(ds))))
    assert 3 <= len(LatentDataset(str(ds))) <= killed <= 5

    last = subprocess.run(cmd, env=url_env(opts), capture_output=True, text=True, timeout=300)
    assert last.returncode == 0, last.stderr[-3000:]
    summary = json.loads(last.stdout)
    assert (summary["skipped"], summary["encoded"], summary["rejects"]) == (killed, 8 - killed, {}), summary
    assert_same_latents(whole, ds)


def visible_files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".")}  # fmt: skip


@pytest.mark.parametrize("stage", ["annotate", "encode"])
def test_a_store_that_cannot_be_reached_stops_with_one_line(server, url_dataset, tmp_path, stage):
    """The photos' endpoint refuses every connection (the server is gone): after its retries the
    command stops with one line naming the photo and the endpoint, nothing is written, and the
    error raised in a DataLoader worker is said as such, not as torch's wrapped traceback."""
    import subprocess
    import sys

    from train_helpers import free_port

    opts, _ = server
    ds = copy_dataset(url_dataset, tmp_path / "ds")
    before = visible_files(ds)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {
        **url_env(opts),
        "AWS_ENDPOINT_URL": dead,
        "AWS_MAX_ATTEMPTS": "1",
    }  # botocore: no retries of its own
    args = {
        "annotate": ["--stage", "embed", "--embed-model", "builtin:image-stats", "--device", "cpu"],
        "encode": ["--vae", "tiny"],
    }[stage]
    res = subprocess.run(
        [sys.executable, "-m", "bigasp", stage, str(ds), *args, "--num-workers", "2", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error")]
    assert "Traceback" not in res.stderr and len(errors) == 1, res.stderr[-3000:]
    assert (
        f"cannot read s3://{BUCKET}/ranks/" in errors[0] and f"the object store at {dead} failed" in errors[0]
    )
    assert "DataLoader worker" not in errors[0], errors[0]
    assert visible_files(ds) == before  # no latent, index, part or manifest change (locks aside)


def test_remote_call_turns_a_store_that_fails_every_attempt_into_one_line(monkeypatch):
    """Unit: refused connections are retried ATTEMPTS times, then one RemoteAccessError naming the
    URL (ingest re-raises it instead of rejecting every image); other errors pass unchanged."""
    from bigasp.store import remote

    monkeypatch.setattr(remote, "BACKOFF_S", 0.0)
    calls = []

    def refused():
        calls.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(
        remote.RemoteAccessError, match=r"^cannot read s3://b/k\.jpg: the object store at .* failed 6"
    ):
        remote.call("s3://b/k.jpg", refused)
    assert len(calls) == remote.ATTEMPTS
    with pytest.raises(FileNotFoundError):
        remote.call("s3://b/k.jpg", lambda: (_ for _ in ()).throw(FileNotFoundError("k.jpg")))
