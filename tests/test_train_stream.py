"""Training while the encoder still writes the dataset: the streaming first pass.

Shards are "published" here the way `bigasp encode` publishes them: the shard file is complete
and its index file appears. The publisher is driven by the loader's own wait decisions (the
`exchange` hook that, in a multi-rank run, broadcasts rank 0's decision), so the waves are
deterministic and a resume can be compared batch for batch with the uninterrupted run.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from bigasp.store import LatentDataset, layout
from bigasp.store.streaming import StreamingLatentDataset
from bigasp.train.data import DataConfig
from bigasp.train.stream import StreamingLoader
from bigasp.train.synthetic import write_synthetic_latent_dataset


class Publisher:
    """Holds a dataset's index files back and publishes them one (or more) at a time."""

    def __init__(self, root: Path, first: int):
        self.index = root / layout.INDEX_DIR
        self.held = root / "held-back"
        self.held.mkdir()
        self.names = sorted(p.name for p in self.index.glob("*.parquet"))
        for n in self.names:
            (self.index / n).rename(self.held / n)
        self.count = 0
        self.publish(first)

    def publish(self, k: int = 1) -> None:
        for n in self.names[self.count : self.count + k]:
            (self.held / n).rename(self.index / n)
        self.count = min(len(self.names), self.count + k)

    def rewind(self, count: int) -> None:
        """Un-publish back to `count` files (to replay the same publication sequence)."""
        for n in self.names[count : self.count]:
            (self.index / n).rename(self.held / n)
        self.count = count

    def exchange(self, decision):
        if decision[0] == "wait":  # the loader found nothing new: the encoder finishes one more shard
            self.publish(1)
        return decision


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(
        **{
            "dataset": str(root),
            "seed": 3,
            "device_batch_size": 2,
            "num_workers": 0,
            "validation_size": 4,
            "stable_size": 4,
            "stream": True,
            "stream_poll_s": 0.01,
            "stream_timeout_s": 60,
            **kw,
        }
    )


def _loader(root: Path, pub: Publisher, **kw) -> StreamingLoader:
    return StreamingLoader(StreamingLatentDataset(str(root)), _cfg(root, **kw), exchange=pub.exchange)


@pytest.fixture
def streamed(tmp_path):
    root = write_synthetic_latent_dataset(tmp_path / "ds", n=60, seed=0, shard_size=6)  # 10 shards
    return root, Publisher(root, first=2)


def test_first_pass_trains_published_images_once_in_waves_then_the_whole_dataset(streamed):
    root, pub = streamed
    loader = _loader(root, pub, device_batch_size=4)  # 6 images a shard: most waves leave a remainder
    it = iter(loader)
    epoch0, published_at = [], []
    b = next(it)
    while b.epoch == 0:
        epoch0.append(b)
        published_at.append(len(loader.dataset))
        b = next(it)
    assert pub.count == 10 and loader.done and loader.waits >= 8  # it waited for every later shard
    assert loader.waves[0] == pub.names[:2] and [len(w) for w in loader.waves[1:]] == [1] * 8
    ds = loader.dataset
    assert ds.index_files_taken == pub.names and len(ds) == 60
    rows0 = np.concatenate([x.indices.numpy() for x in epoch0])
    split = loader.split
    assert len(split.validation) == 4 and len(split.stable) == 4  # cutoff from the manifest: exactly as asked
    assert len(set(rows0.tolist())) == len(rows0)  # no image twice in the pass
    assert set(rows0.tolist()) <= set(split.train.tolist())  # never a held-out image
    assert (
        len(split.train) - len(rows0) < 2 * 3
    )  # only the pool's remainder (< a batch per bucket) is dropped
    # every batch holds images already published when it was planned, read with their own latents
    full = LatentDataset(str(root))
    by_id = {full.table.column("id")[i].as_py(): i for i in range(len(full))}
    for x, n in zip(epoch0, published_at, strict=True):
        assert int(x.indices.max()) < n
        for j, r in enumerate(x.indices.tolist()):
            assert torch.equal(x.latents[j], full.read_latent(by_id[ds.table.column("id")[r].as_py()]))
    # rows are appended wave by wave, sorted by id within a wave: the first wave holds shards 0-1
    assert ds.table.column("id").to_pylist()[:12] == [f"img{i:05d}" for i in range(12)]
    # epoch 1 plans the whole training split as an ordinary epoch
    epoch1 = [b] + [next(it) for _ in range(loader.batches_per_epoch() - 1)]
    rows1 = np.concatenate([x.indices.numpy() for x in epoch1])
    assert all(x.epoch == 1 for x in epoch1) and set(rows1.tolist()) <= set(split.train.tolist())
    assert len(rows1) == len(set(rows1.tolist())) >= len(split.train) - 4 * loader.buckets.n_buckets
    assert next(it).epoch == 2


def test_resume_mid_pass_and_after_it_replays_the_waves_exactly(streamed):
    root, pub = streamed
    loader = _loader(root, pub)
    it = iter(loader)
    batches, states, counts = [], [], []
    while True:
        states.append(loader.state_dict())
        counts.append(pub.count)
        b = next(it)
        batches.append(b)
        if b.epoch == 1 and len(batches) > 3 and batches[-4].epoch == 1:
            break
    cuts = [k for k in range(len(batches)) if states[k]["stream"]["waves"] and states[k]["epoch"] == 0]
    mid = cuts[len(cuts) // 2]
    after = next(k for k in range(len(batches)) if states[k]["epoch"] == 1 and k > 0)
    assert len(states[mid]["stream"]["waves"]) > 2 and not states[mid]["stream"]["done"]
    assert states[after]["stream"]["done"]
    for cut in (mid, after):
        pub.rewind(counts[cut])  # the encoder had published this much when the checkpoint was written
        fresh = _loader(root, pub)
        fresh.load_state_dict(states[cut])
        resumed = iter(fresh)
        for want in batches[cut:]:
            got = next(resumed)
            assert (got.epoch, got.position) == (want.epoch, want.position)
            assert torch.equal(got.indices, want.indices) and got.prompts == want.prompts
            assert torch.equal(got.latents, want.latents) and torch.equal(got.crop, want.crop)
        assert fresh.waves == loader.waves[: len(fresh.waves)]


def test_two_ranks_take_the_same_waves_and_split_one_global_batch_sequence(streamed):
    root, pub = streamed
    single = _loader(root, pub)
    it = iter(single)
    want = []
    while (b := next(it)).epoch == 0:
        want.append(b)
    pub.rewind(2)

    # two ranks in threads; `exchange` broadcasts rank 0's decision as the process group would
    box: list = [None]
    barrier = threading.Barrier(2)

    def exchange(rank):
        def go(decision):
            if rank == 0:
                box[0] = pub.exchange(decision)
            barrier.wait()
            out = box[0]
            barrier.wait()
            return out

        return go

    got: dict[int, list] = {0: [], 1: []}
    loaders = {}

    def run(rank):
        lo = StreamingLoader(
            StreamingLatentDataset(str(root)),
            _cfg(root),
            rank=rank,
            world_size=2,
            exchange=exchange(rank),
        )
        loaders[rank] = lo
        for b in lo:
            if b.epoch > 0:
                break
            got[rank].append(b)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert loaders[0].waves == loaders[1].waves == single.waves
    assert len(got[0]) == len(got[1])
    merged = {b.position: b for r in (0, 1) for b in got[r]}
    assert sorted(merged) == list(range(len(merged)))
    for b in want[: len(merged)]:  # the same global batch list as one rank (bar an odd tail)
        assert torch.equal(merged[b.position].indices, b.indices) and merged[b.position].prompts == b.prompts
    assert len(want) - len(merged) in (0, 1)


def test_a_dead_encoder_times_out_with_a_clear_error(tmp_path):
    root = write_synthetic_latent_dataset(tmp_path / "ds", n=24, seed=0, shard_size=6)
    pub = Publisher(root, first=1)
    loader = StreamingLoader(
        StreamingLatentDataset(str(root)),
        _cfg(root, stream_timeout_s=0.2, validation_size=0, stable_size=0),
    )
    from bigasp.errors import DataError

    with pytest.raises(
        DataError, match=r"no new shard for 0 s while 18 ingested image\(s\) still have no latent"
    ):
        for _ in loader:
            pass
    assert pub.count == 1


def test_encode_rejects_complete_the_pass(streamed):
    import pyarrow as pa

    from bigasp.store.manifest import REJECTS_SCHEMA

    root, pub = streamed
    pub.rewind(0)
    pub.publish(9)  # the last shard's images were rejected by the encoder instead
    (pub.held / pub.names[9]).unlink()
    rej = [
        {"path": f"/synthetic/img{i:05d}.png", "reason": "decode", "detail": "x", "file_size": 1, "mtime": None,
         "id": f"img{i:05d}", "stage": "encode"}
        for i in range(54, 60)
    ]  # fmt: skip
    (root / layout.ENCODE_REJECTS_DIR).mkdir(parents=True, exist_ok=True)
    layout.atomic_write_parquet(
        pa.Table.from_pylist(rej, schema=REJECTS_SCHEMA), root / layout.ENCODE_REJECTS_DIR / "r.parquet"
    )
    loader = StreamingLoader(StreamingLatentDataset(str(root)), _cfg(root, stream_timeout_s=5))
    it = iter(loader)
    while next(it).epoch == 0:
        pass
    assert (
        loader.done
        and loader.waits == 0
        and len(loader.dataset) == 54
        and loader.dataset.missing_latents() == 0
    )


def test_train_waits_for_the_encoder_stops_cleanly_on_sigterm_and_resumes_when_shards_arrive(tmp_path):
    """A real `bigasp train` subprocess on a dataset half published: it trains what is there,
    waits, checkpoints on SIGTERM while waiting, and a resume takes the rest in as a new wave."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from bigasp.config import dump_toml
    from bigasp.train import checkpoint as ck
    from train_helpers import make_cfg

    repo = Path(__file__).resolve().parents[1]
    root = write_synthetic_latent_dataset(tmp_path / "ds", n=24, seed=2, shard_size=6)
    pub = Publisher(root, first=2)
    cfg = make_cfg(
        tmp_path / "run", root,
        data={"stream": True, "stream_poll_s": 0.2},
        train={"batch_size": 2, "max_samples": 40, "warmup_samples": 4},
        validation={"every": 8},
    )  # fmt: skip
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(dump_toml(cfg.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo / "src")}

    def train(*args: str, log_name: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "bigasp.cli", "train", str(cfg_path), *args],
            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / log_name).open("w"), text=True,
        )  # fmt: skip

    proc = train(log_name="first.log")
    deadline = time.monotonic() + 300  # a condition, not a time: only a hung run reaches this
    while "waiting for the encoder" not in (tmp_path / "first.log").read_text():
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never waited for the encoder"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, (tmp_path / "first.log").read_text()[-3000:]
    (ckpt,) = ck.list_complete_checkpoints(cfg.run_dir)
    meta = ck.read_meta(ckpt)
    assert meta["reason"] == "signal" and 0 < meta["samples_seen"] < 40
    state = json.loads((ckpt / "state" / "trainer.json").read_text())["loader"][0]
    assert state["epoch"] == 0 and state["stream"]["waves"] == [pub.names[:2]] and not state["stream"]["done"]

    pub.publish(2)  # the encoder finishes
    resumed = train("--resume", "auto", log_name="second.log")
    assert resumed.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()[-3000:]
    last = ck.list_complete_checkpoints(cfg.run_dir)[-1]
    assert ck.read_meta(last)["samples_seen"] == 40
    final = json.loads((last / "state" / "trainer.json").read_text())["loader"][0]["stream"]
    assert final["waves"] == [pub.names[:2], pub.names[2:]] and final["done"]
    records = [json.loads(x) for x in (Path(cfg.run_dir) / "batches.rank0.jsonl").read_text().splitlines()]
    first_pass = [r for rec in records if rec["epoch"] == 0 for r in rec["rows"]]
    assert len(first_pass) == len(set(first_pass)) >= 16  # each image at most once in the pass
    assert any(rec["epoch"] >= 1 for rec in records)
    metrics = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    sizes = [m["val/images"] for m in metrics if "val/images" in m]
    assert sizes[-1] == 2 and sizes == sorted(sizes)  # the held-out set fills up as shards arrive (2 of 24)


def test_two_gloo_ranks_agree_on_every_wave_while_shards_arrive(tmp_path):
    """Real trainer, 2 gloo processes; shards are published on a timer (timing-dependent waves):
    rank 0's choice is broadcast, so both ranks record the same waves and split the same batches."""
    import json

    import torch.multiprocessing as mp

    from bigasp.train import checkpoint as ck
    from train_helpers import ddp_worker, free_port, make_cfg

    root = write_synthetic_latent_dataset(tmp_path / "ds", n=24, seed=2, shard_size=6)
    pub = Publisher(root, first=1)
    cfg = make_cfg(
        tmp_path / "run", root, data={"stream": True, "stream_poll_s": 0.1}, train={"max_samples": 28},
    )  # fmt: skip
    stop = threading.Event()

    def encoder():  # the rest a shard a second, once training is under way on the first
        log = Path(cfg.run_dir) / "batches.rank0.jsonl"
        while not (log.exists() and log.stat().st_size) and not stop.wait(0.1):
            pass
        while pub.count < len(pub.names) and not stop.wait(1.0):
            pub.publish(1)

    t = threading.Thread(target=encoder, daemon=True)
    t.start()
    try:
        mp.start_processes(
            ddp_worker, args=(2, free_port(), cfg.model_dump_json()), nprocs=2, start_method="fork"
        )
    finally:
        stop.set()
        t.join(timeout=10)
    last = ck.list_complete_checkpoints(cfg.run_dir)[-1]
    loaders = json.loads((last / "state" / "trainer.json").read_text())["loader"]
    assert len(loaders) == 2 and loaders[0]["stream"] == loaders[1]["stream"]
    assert loaders[0]["stream"]["done"] and [f for w in loaders[0]["stream"]["waves"] for f in w] == pub.names
    assert loaders[0]["stream"]["waves"][0] == pub.names[:1]  # the rest came in later wave(s)
    rows = {}
    for r in (0, 1):
        for line in (Path(cfg.run_dir) / f"batches.rank{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            rows.setdefault(rec["epoch"], []).append((rec["position"], tuple(rec["rows"])))
    first = sorted(rows[0])
    assert [p for p, _ in first] == list(range(len(first)))  # ranks took alternate global batches
    flat = [r for _, rs in first for r in rs]
    assert len(flat) == len(set(flat))


def test_streaming_follows_one_dataset_and_says_so_for_a_list(tmp_path):
    from bigasp.errors import ConfigError
    from bigasp.train.data import open_dataset

    a = write_synthetic_latent_dataset(tmp_path / "a", n=6, seed=0)
    b = write_synthetic_latent_dataset(tmp_path / "b", n=6, seed=1, id_prefix="b")
    cfg = DataConfig(dataset=[str(a), str(b)], stream=True)
    with pytest.raises(ConfigError, match=r"data\.stream follows one dataset's encoder"):
        open_dataset(cfg, streaming=True)
    one = open_dataset(DataConfig(dataset=str(a), stream=True), streaming=True)
    assert one.streaming and len(one) == 0 and one.n_images == 6


def test_dataset_batches_says_a_streaming_first_pass_is_not_planned_ahead(tmp_path, capsys):
    from bigasp.cli import main

    root = write_synthetic_latent_dataset(tmp_path / "ds", n=24, seed=0)
    main(["dataset", "batches", str(root), "--set", "stream=true", "--set", "device_batch_size=2"])
    out = capsys.readouterr()
    assert "data.stream is set" in out.err and "batch" in out.out


def test_variants_arriving_before_and_after_their_image_join_its_row(tmp_path):
    """An encoder with --variants writes variant shards in any order: a variant published before
    its image's variant 0 waits, then joins the row; epoch 1 trains on every variant as a
    finished dataset would, and a shard listing an image twice keeps the first one taken."""
    from bigasp.store import RecordMeta, ShardWriter
    from bigasp.train.data import pick_variants

    root = write_synthetic_latent_dataset(tmp_path / "ds", n=24, seed=1, shard_size=6)
    full = LatentDataset(str(root))
    for v, rows in ((1, range(24)), (2, range(0, 12))):  # generation 2 of half the images only
        w = ShardWriter(root, f"var-{v}", 64, 64)
        for i in rows:
            row = full.table.slice(i, 1).to_pylist()[0]
            meta = RecordMeta(row["id"], row["original_height"], row["original_width"], v, 2 * v, variant=v)
            w.add((full.read_latent_numpy(i) + v).astype(np.float16), meta)
        w.close()
    ref = LatentDataset(str(root))
    assert ref.n_variants.tolist() == [3] * 12 + [2] * 12
    pub = Publisher(root, first=0)
    order = ["var-1.parquet", "synthetic-000.parquet", "var-2.parquet"]  # variants 1, 2 come first
    pub.names = order + [n for n in pub.names if n not in order]
    pub.publish(2)
    loader = StreamingLoader(StreamingLatentDataset(str(root)), _cfg(root, validation_size=0, stable_size=0),
                             exchange=pub.exchange)  # fmt: skip
    it = iter(loader)
    while (b := next(it)).epoch == 0:
        assert all(torch.equal(b.latents[j], ref.read_latent(_ref_row(ref, loader, r))) for j, r in
                   enumerate(b.indices.tolist()))  # fmt: skip
    ds = loader.dataset
    by_id = {ds.table.column("id")[r].as_py(): r for r in range(len(ds))}
    assert sorted(ds.n_variants.tolist()) == sorted(ref.n_variants.tolist())
    for i in range(len(ref)):
        r = by_id[ref.table.column("id")[i].as_py()]
        assert ds.n_variants[r] == ref.n_variants[i]
        for v in range(int(ref.n_variants[i])):
            assert torch.equal(ds.read_latent(r, v), ref.read_latent(i, v)) and ds.crop_of(
                r, v
            ) == ref.crop_of(i, v)
    assert loader.generations(1) == 2  # generation 2 is complete for half the images only
    epoch1 = [b] + [next(it) for _ in range(loader.batches_per_epoch() - 1)]
    for x in epoch1:  # epoch 1 trains a variant of every image, as a finished dataset would
        rows = x.indices.numpy()
        picks = pick_variants(np.minimum(ds.n_variants[rows], 2), rows, seed=3, epoch=1)
        for j, (r, v) in enumerate(zip(rows.tolist(), picks.tolist(), strict=True)):
            assert torch.equal(x.latents[j], ds.read_latent(r, v)) and tuple(
                x.crop[j].tolist()
            ) == ds.crop_of(r, v)
    assert {int(v) for x in epoch1 for v in (x.crop[:, 0] > 0).tolist()} == {0, 1}
    assert ds.verify() == []


def _ref_row(ref, loader, r: int) -> int:
    iid = loader.dataset.table.column("id")[r].as_py()
    return ref.table.column("id").to_pylist().index(iid)


def test_manifest_lookup_agrees_with_arrow_and_survives_hash_collisions(tmp_path):
    import pyarrow as pa
    import pyarrow.compute as pc

    root = write_synthetic_latent_dataset(tmp_path / "ds", n=300, seed=0)
    ds = StreamingLatentDataset(str(root))
    manifest_ids = ds.manifest.column("id")
    ids = pa.array([f"img{i:05d}" for i in range(0, 400, 7)] + ["not-ingested"])
    want = pc.fill_null(pc.index_in(ids, value_set=manifest_ids), -1).to_numpy(zero_copy_only=False)
    assert (ds.manifest_positions(ids) == want).all() and (want == -1).sum() == 16
    # every id's hash made equal: each binary search lands on one candidate, the id check catches it
    ds._keys_sorted = np.zeros_like(ds._keys_sorted)
    from bigasp.store import streaming

    real = streaming.id_keys
    streaming.id_keys = lambda a: np.zeros(len(a), np.uint64)
    try:
        assert (ds.manifest_positions(ids) == want).all()
    finally:
        streaming.id_keys = real


def test_a_later_wave_from_another_vae_stops_the_run_and_keeps_the_steps_trained(tmp_path):
    """Each wave's new shards get the start-up check: a shard scaled for another VAE arriving
    mid-pass stops the run with the check's message, after a checkpoint of the steps trained."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from bigasp.errors import DataError
    from bigasp.store import RecordMeta, ShardWriter
    from bigasp.store.manifest import MANIFEST_SCHEMA
    from bigasp.train import checkpoint as ck
    from bigasp.train.trainer import train
    from train_helpers import make_cfg

    root = write_synthetic_latent_dataset(tmp_path / "ds", n=24, seed=2, shard_size=12)
    manifest = pq.read_table(root / layout.MANIFEST)
    extra = manifest.slice(0, 6).to_pylist()
    w = ShardWriter(root, "other-vae", 64, 64, header={"scaling_factor": 0.5})
    full = LatentDataset(str(root))
    for k, row in enumerate(extra):
        row["id"] = f"late{k:03d}"
        w.add(full.read_latent_numpy(k), RecordMeta(row["id"], row["height"], row["width"], 0, 0))
    w.close()
    layout.atomic_write_parquet(
        pa.concat_tables([manifest, pa.Table.from_pylist(extra, schema=MANIFEST_SCHEMA)]),
        root / layout.MANIFEST,
    )
    pub = Publisher(root, first=0)
    pub.names = [*sorted(n for n in pub.names if n.startswith("synthetic")), "other-vae.parquet"]
    pub.publish(2)
    cfg = make_cfg(tmp_path / "run", root, data={"stream": True, "stream_poll_s": 0.05},
                   train={"batch_size": 2, "max_samples": 400})  # fmt: skip
    log = Path(cfg.run_dir) / "batches.rank0.jsonl"
    stop = threading.Event()

    def encoder():  # the other VAE's shard arrives once training is under way
        while not (log.exists() and log.stat().st_size) and not stop.wait(0.05):
            pass
        pub.publish(1)

    t = threading.Thread(target=encoder, daemon=True)
    t.start()
    try:
        with pytest.raises(DataError, match=r"latents were scaled by 0\.5 but the model's VAE"):
            train(cfg)
    finally:
        stop.set()
        t.join(timeout=10)
    (last,) = ck.list_complete_checkpoints(cfg.run_dir)
    assert ck.read_meta(last)["reason"] == "data_error"
    state = json.loads((last / "state" / "trainer.json").read_text())["loader"][0]["stream"]
    assert state["waves"] == [pub.names[:2]]  # the refused wave is not recorded


def test_resume_names_a_recorded_index_file_that_is_gone(streamed):
    from bigasp.errors import DataError

    root, pub = streamed
    loader = _loader(root, pub)
    it = iter(loader)
    while len(loader.waves) < 3:
        next(it)
    state = loader.state_dict()
    gone = state["stream"]["waves"][1][0]
    (root / layout.INDEX_DIR / gone).unlink()
    fresh = _loader(root, pub)
    with pytest.raises(
        DataError, match=r"an index file this run trained on is gone .*" + gone.replace(".", r"\.")
    ):
        fresh.load_state_dict(state)


def test_mixing_applies_from_epoch_1_of_a_streaming_run(tmp_path):
    root = write_synthetic_latent_dataset(
        tmp_path / "ds", n=48, seed=0, shard_size=8, sources=("photo", "anime")
    )
    pub = Publisher(root, first=2)
    loader = _loader(
        root, pub, validation_size=0, stable_size=0, mix={"by": "source", "repeats": {"anime": 3}}
    )
    it = iter(loader)
    first = []
    while (b := next(it)).epoch == 0:
        first += b.indices.tolist()
    source = loader.dataset.table.column("source").to_pylist()
    assert sorted(first) == list(range(48)) and loader.mix.names == ["anime", "photo"]
    later = b.indices.tolist() + [
        r for _ in range(loader.batches_per_epoch() - 1) for r in next(it).indices.tolist()
    ]
    counts = {s: sum(source[r] == s for r in later) for s in ("photo", "anime")}
    assert counts == {"photo": 24, "anime": 72}  # epoch 1: each anime image three times
