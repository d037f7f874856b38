"""Latent variants: `encode --variants K` (and a later run adding a generation) stores K keyed
crops + VAE samples per image; training cycles through them per (seed, epoch, row) and resumes
exactly; `dataset info` shows variants and their cost; older index files read as variant 0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from bigasp.buckets import BucketConfig, BucketSet, place
from bigasp.prep import encode as enc
from bigasp.prep.config import EncodeConfig, IngestConfig
from bigasp.prep.ingest import ingest
from bigasp.store import LatentDataset, RecordMeta, ShardWriter, layout
from bigasp.store.info import dataset_info
from bigasp.text.synthesis import EVAL_EPOCH
from bigasp.train.data import DataConfig, TrainLoader, pick_variants
from bigasp.train.synthetic import write_synthetic_latent_dataset

TINY = BucketConfig(step=16, min_area=48 * 64, max_area=64 * 64)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("var")
    (d / "src").mkdir()
    for k, (w, h) in enumerate([(120, 90), (90, 130), (100, 100)]):  # all crop along one axis
        rng = np.random.default_rng(k)
        small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(d / "src" / f"im{k}.jpg")
    ingest([d / "src"], d / "ds", IngestConfig(buckets=TINY, progress=False))
    return d / "ds"


def _ecfg(**kw) -> EncodeConfig:
    return EncodeConfig(**{"vae": "tiny", "num_workers": 0, "batch_size": 4, "progress": False, **kw})


def test_encode_variants_then_a_new_generation(ingested, tmp_path):
    ds_dir = tmp_path / "ds"
    shutil.copytree(ingested, ds_dir)
    one = enc.encode(ds_dir, _ecfg())
    before = LatentDataset(str(ds_dir))
    assert one.encoded == 3 and set(before.n_variants.tolist()) == {1}
    v0 = [before.read_latent(i) for i in range(3)]

    more = enc.encode(ds_dir, _ecfg(variants=3))  # a later run adds generations 1 and 2 only
    assert more.skipped == 3 and more.encoded == 6
    ds = LatentDataset(str(ds_dir))
    assert len(ds) == 3 and ds.n_variants.tolist() == [3, 3, 3] and ds.verify() == []
    buckets = BucketSet(TINY.buckets())
    for i in range(3):
        assert torch.equal(ds.read_latent(i, 0), v0[i])  # variant 0 untouched: an old dataset is variant 0
        lat = [ds.read_latent(i, v).float() for v in range(3)]
        assert all((lat[a] - lat[b]).abs().max() > 1e-3 for a, b in ((0, 1), (0, 2), (1, 2)))
        row = ds.table.slice(i, 1).to_pylist()[0]
        for v in range(3):  # each variant records its own keyed crop, the one `place` gives its key
            p = place(row["height"], row["width"], buckets, seed=0, image_id=enc.variant_key(row["id"], v))
            assert ds.crop_of(i, v) == (p.crop_top, p.crop_left)
    # the crops differ between variants, not only the VAE samples
    assert any(len({ds.crop_of(i, v) for v in range(3)}) > 1 for i in range(3))
    info = dataset_info(str(ds_dir))
    assert info["variants"] == {"3": 3} and info["latent_records"] == 9 and info["latents"] == 3
    assert set(info["variant_bytes"]) == {"0", "1", "2"}
    assert sum(info["variant_bytes"].values()) == int(ds.records.column("length").to_numpy().sum())


def test_variant_choice_cycles_per_epoch_and_evaluation_uses_variant_zero():
    rows = np.arange(50)
    n = np.array([1, 2, 3, 4, 5] * 10)
    picks = np.stack([pick_variants(n, rows, seed=7, epoch=e) for e in range(12)])
    assert (picks < n).all() and (picks >= 0).all()
    for r in range(50):
        k = int(n[r])
        assert sorted(picks[:k, r].tolist()) == list(range(k))  # every variant once in n epochs
        assert all(picks[e, r] == picks[e + k, r] for e in range(12 - k))
    assert not (pick_variants(n, rows, seed=8, epoch=0) == picks[0]).all()  # the seed matters
    assert (pick_variants(n, rows, seed=7, epoch=EVAL_EPOCH) == 0).all()


def _add_generation(root: Path, v: int, rows=None) -> None:
    """Publish variant `v` (latent + v, crop (v, 2v)) of `rows` (default all) in a new shard, as an
    encoder adding a generation would."""
    ds = LatentDataset(str(root))
    w = ShardWriter(root, f"gen-{v}-{len(list((root / layout.INDEX_DIR).glob('*')))}", 64, 64)
    for i in range(len(ds)) if rows is None else rows:
        row = ds.table.slice(i, 1).to_pylist()[0]
        meta = RecordMeta(row["id"], row["original_height"], row["original_width"], v, 2 * v, variant=v)
        w.add((ds.read_latent_numpy(i) + v).astype(np.float16), meta)
    w.close()


def _with_variants(root: Path, n: int = 12, k: int = 3) -> Path:
    """The synthetic dataset plus variants 1..k-1 (other latents, other crops)."""
    write_synthetic_latent_dataset(root, n=n, seed=0)
    for v in range(1, k):
        _add_generation(root, v)
    return root


def test_training_sees_a_fresh_variant_each_epoch_and_resumes_exactly(tmp_path):
    root = _with_variants(tmp_path / "ds")
    ds = LatentDataset(str(root))
    assert ds.n_variants.tolist() == [3] * 12
    cfg = DataConfig(
        dataset=str(root), seed=5, device_batch_size=2, num_workers=0, validation_size=0, stable_size=0
    )
    loader = TrainLoader(ds, cfg)
    per_epoch = loader.batches_per_epoch()
    it = iter(loader)
    seen: dict[int, list[float]] = {}
    batches = []
    for _ in range(3 * per_epoch):
        b = next(it)
        batches.append(b)
        for j, r in enumerate(b.indices.tolist()):
            v = int(pick_variants(ds.n_variants[[r]], np.array([r]), seed=5, epoch=b.epoch)[0])
            assert torch.equal(b.latents[j], ds.read_latent(r, v))
            assert tuple(b.crop[j].tolist()) == ds.crop_of(r, v)
            seen.setdefault(r, []).append(v)
    assert all(sorted(vs) == [0, 1, 2] for vs in seen.values())  # 3 epochs: each variant once
    # resume mid-epoch-2 with a fresh loader: the same latents and crops follow
    cut = per_epoch + 2
    fresh = TrainLoader(LatentDataset(str(root)), cfg)
    probe = TrainLoader(ds, cfg)
    probe_it = iter(probe)
    for _ in range(cut):
        next(probe_it)
    fresh.load_state_dict(probe.state_dict())
    resumed = iter(fresh)
    for b in batches[cut:]:
        r = next(resumed)
        assert torch.equal(r.latents, b.latents) and torch.equal(r.crop, b.crop) and r.prompts == b.prompts


def test_index_files_without_a_variant_column_read_as_variant_zero(tmp_path):
    root = write_synthetic_latent_dataset(tmp_path / "ds", n=6, seed=1)
    for p in (root / layout.INDEX_DIR).glob("*.parquet"):  # as written before variants existed
        t = pq.read_table(p)
        pq.write_table(t.drop(["variant"]), p)
    ds = LatentDataset(str(root))
    assert ds.n_variants.tolist() == [1] * 6 and ds.records.column("variant").to_pylist() == [0] * 6
    assert ds.verify() == []
    assert json.loads(json.dumps(dataset_info(str(root))))["variants"] == {"1": 6}


def test_variants_published_while_training_join_at_the_next_epoch_and_resume_exactly(tmp_path):
    root = write_synthetic_latent_dataset(tmp_path / "ds", n=12, seed=0)
    cfg = DataConfig(
        dataset=str(root), seed=5, device_batch_size=2, num_workers=0, validation_size=0, stable_size=0
    )
    loader = TrainLoader(LatentDataset(str(root)), cfg)
    per = loader.batches_per_epoch()
    it = iter(loader)
    epoch0 = [next(it)]
    _add_generation(root, 1)  # an encoder publishes generation 1 during epoch 0 ...
    _add_generation(root, 2, rows=range(6))  # ... and half of generation 2
    epoch0 += [next(it) for _ in range(per - 1)]
    ref = LatentDataset(str(root))
    assert ref.n_variants.tolist() == [3] * 6 + [2] * 6
    for b in epoch0:  # epoch 0 keeps the variants it started with
        assert b.epoch == 0 and all(
            torch.equal(b.latents[j], ref.read_latent(r, 0)) for j, r in enumerate(b.indices)
        )
    first1 = next(it)
    assert first1.epoch == 1 and loader.generations(1) == 2  # generation 2 is incomplete: not yet used
    state = loader.state_dict()
    assert state["variant_generations"] == 2
    later = [next(it) for _ in range(per)]  # the rest of epoch 1 and the start of epoch 2
    for b in [first1, *later[: per - 1]]:
        for j, r in enumerate(b.indices.tolist()):
            v = int(pick_variants(np.array([2]), np.array([r]), seed=5, epoch=1)[0])
            assert torch.equal(b.latents[j], ref.read_latent(r, v)) and tuple(
                b.crop[j].tolist()
            ) == ref.crop_of(r, v)
    assert {int(v) for b in [first1, *later[: per - 1]] for v in (b.crop[:, 0] > 0).tolist()} == {0, 1}
    # generation 2 completes before the resume: the resumed epoch 1 still uses the 2 it recorded
    _add_generation(root, 2, rows=range(6, 12))
    fresh = TrainLoader(LatentDataset(str(root)), cfg)
    fresh.load_state_dict(state)
    resumed = iter(fresh)
    for b in later[: per - 1]:
        r = next(resumed)
        assert r.epoch == 1 and torch.equal(r.latents, b.latents) and torch.equal(r.crop, b.crop)
    assert next(resumed).epoch == 2 and fresh.generations(2) == 3  # the next epoch takes in generation 2
