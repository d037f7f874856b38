"""Training data path on a real tiny latent store: batches, exact resume, workers, split, eval, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from bigasp.store import LatentDataset, RecordMeta, ShardWriter, layout
from bigasp.store.manifest import MANIFEST_SCHEMA, init_dataset
from bigasp.text.aliases import AliasTable
from bigasp.text.chunking import n_chunks_for
from bigasp.text.synthesis import EVAL_EPOCH, SampleMeta, synthesize
from bigasp.train.data import (
    Batch,
    DataConfig,
    Sample,
    TrainLoader,
    collate,
    eval_batches,
    row_token_estimates,
    split_dataset,
)

WORDS = [
    "woman",
    "man",
    "dog",
    "cat",
    "red",
    "blue",
    "sitting",
    "standing",
    "bed",
    "field",
    "photo",
    "of",
    "a",
    "the",
    "with",
    "and",
    "on",
    "in",
    "sunny",
    "dark",
    "hair",
]
SEED = 1234


def make_dataset(root: Path, n: int = 90, buckets=((64, 64), (64, 32), (32, 64))) -> Path:
    """Row i (ids sort in creation order) has a latent filled with i, original (500+i, 400+i), crop (i%7, i%5)."""
    init_dataset(root)
    rng = np.random.default_rng(0)
    rows = []
    writers = {b: ShardWriter(root, f"t-{b[0]}x{b[1]}", *b) for b in buckets}
    for i in range(n):
        iid = f"img{i:04d}"
        b = buckets[i % len(buckets)]
        writers[b].add(
            np.full((4, b[0] // 8, b[1] // 8), i, dtype=np.float16),
            RecordMeta(iid, 500 + i, 400 + i, i % 7, i % 5),
        )
        cap = " ".join(rng.choice(WORDS, int(rng.choice([8, 40, 110, 170])))) + "."
        rows.append(
            {
                "id": iid,
                "path": f"/x/{iid}.jpg",
                "width": 400 + i,
                "height": 500 + i,
                "captions": [cap] if i % 4 else [cap, "a short caption"],
                "tags": [f"tag_{k}" for k in rng.choice(40, int(rng.integers(3, 30)), replace=False)],
                "score": i % 10,
                "source": "flickr" if i % 2 else None,
                "watermark": i % 5 == 0,
                "extra": json.dumps({"subreddit": "r/pics"} if i % 3 == 0 else {}),
            }
        )
    for w in writers.values():
        w.close()
    layout.atomic_write_parquet(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), root / layout.MANIFEST)
    return root


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> LatentDataset:
    return LatentDataset(str(make_dataset(tmp_path_factory.mktemp("latents"))))


def cfg(**kw) -> DataConfig:
    base = {"num_workers": 0, "validation_size": 8, "stable_size": 16, "seed": SEED}
    return DataConfig.model_validate({**base, **kw})


def same(a: Batch, b: Batch) -> bool:
    return (
        a.prompts == b.prompts
        and torch.equal(a.indices, b.indices)
        and torch.equal(a.latents, b.latents)
        and torch.equal(a.te1_ids, b.te1_ids)
        and torch.equal(a.te2_ids, b.te2_ids)
        and torch.equal(a.original_size, b.original_size)
        and torch.equal(a.crop, b.crop)
        and torch.equal(a.target_size, b.target_size)
        and (a.epoch, a.position) == (b.epoch, b.position)
    )


def run(ds, c, world, batch, steps, state=None):
    """`steps` steps on every rank; returns per-step lists of rank batches and the state after each step."""
    loaders = [
        TrainLoader(ds, c, rank=r, world_size=world, seed=SEED, device_batch_size=batch) for r in range(world)
    ]
    if state is not None:
        for lo in loaders:
            lo.load_state_dict(state)
    its = [iter(lo) for lo in loaders]
    out, states = [], []
    for _ in range(steps):
        out.append([next(it) for it in its])
        st = [lo.state_dict() for lo in loaders]
        assert all(s == st[0] for s in st)  # every rank agrees on the global position
        states.append(st[0])
    return out, states


@pytest.mark.parametrize(("world", "batch"), [(1, 1), (1, 4), (2, 1), (2, 4)])
def test_exact_resume_element_by_element(ds, world, batch):
    c = cfg(prompt={"tag_prob": 0.5})
    per_epoch = TrainLoader(
        ds, c, rank=0, world_size=world, seed=SEED, device_batch_size=batch
    ).batches_per_epoch()
    total = per_epoch + 3  # crosses an epoch boundary
    full, states = run(ds, c, world, batch, total)
    assert full[per_epoch][0].epoch == 1 and full[per_epoch - 1][0].epoch == 0
    for k in sorted({1, 2, per_epoch // 2, per_epoch - 1, per_epoch, per_epoch + 1}):
        n = min(4, total - k)
        cont, _ = run(ds, c, world, batch, n, state=json.loads(json.dumps(states[k - 1])))
        for step in range(n):
            for r in range(world):
                assert same(cont[step][r], full[k + step][r]), f"k={k} step={step} rank={r}"


def test_resume_on_fewer_ranks_continues_the_same_batch_sequence(ds):
    c = cfg()
    full, states = run(ds, c, 2, 4, 5)
    single, _ = run(ds, c, 1, 4, 6, state=states[1])
    interleaved = [b for step in full[2:5] for b in step]
    assert all(
        same(a, b) for a, b in zip(single, [[x] for x in interleaved], strict=True) for a, b in [(a[0], b[0])]
    )


def test_resume_with_another_device_batch_size_keeps_the_sample_position(ds):
    c = cfg()
    _, states = run(ds, c, 1, 4, 3)
    lo = TrainLoader(ds, c, rank=0, world_size=1, seed=SEED, device_batch_size=1)
    lo.load_state_dict(states[-1])
    assert (lo.epoch, lo.position) == (0, 12)  # 3 batches x 4 samples = sample 12 = batch 12 of size 1
    first = next(iter(lo))
    assert first.position == 12 and len(first) == 1
    with pytest.raises(Exception, match="seed"):
        TrainLoader(ds, cfg(seed=7), rank=0, world_size=1, device_batch_size=4).load_state_dict(states[-1])


def test_num_workers_do_not_change_the_stream(ds):
    lo0 = TrainLoader(ds, cfg(num_workers=0), rank=1, world_size=2, seed=SEED, device_batch_size=4)
    lo2 = TrainLoader(ds, cfg(num_workers=2), rank=1, world_size=2, seed=SEED, device_batch_size=4)
    n = lo0.batches_per_epoch() + 2  # includes a new epoch (fresh workers)
    a = [b for _, b in zip(range(n), lo0, strict=False)]
    b = [b for _, b in zip(range(n), lo2, strict=False)]
    assert all(same(x, y) for x, y in zip(a, b, strict=True))
    assert lo0.state_dict() == lo2.state_dict()


def test_batches_are_homogeneous_and_carry_the_right_data(ds):
    c = cfg(prompt={"tag_prob": 0.5})
    lo = TrainLoader(ds, c, rank=0, world_size=1, seed=SEED, device_batch_size=4)
    table = ds.table.to_pylist()
    est = row_token_estimates(ds.table, c.prompt)
    train = set(lo.split.train.tolist())
    seen = []
    for _, b in zip(range(lo.batches_per_epoch()), lo, strict=False):
        idx = b.indices.tolist()
        seen += idx
        assert set(idx) <= train
        assert b.latents.dtype == torch.float16 and b.te1_ids.dtype == torch.int64
        assert len({tuple(t) for t in b.target_size.tolist()}) == 1
        h, w = b.target_size[0].tolist()
        assert b.latents.shape == (4, 4, h // 8, w // 8)
        assert b.te1_ids.shape == b.te2_ids.shape == (4, b.te1_ids.shape[1], 77)
        assert b.te1_ids.shape[1] == min(3, max(n_chunks_for(int(x)) for x in b.n_tokens))
        assert 1 <= b.chunk_estimate <= 3
        for j, i in enumerate(idx):
            assert (b.latents[j] == i).all()
            assert b.original_size[j].tolist() == [500 + i, 400 + i]
            assert b.crop[j].tolist() == [i % 7, i % 5]
            meta = SampleMeta.from_row(i, table[i], n_tokens=int(est[i]))
            assert b.prompts[j] == synthesize(meta, c.prompt, (SEED, 0, i))
    assert len(seen) == len(set(seen))
    s = lo.stats
    assert s.batches == lo.batches_per_epoch() and sum(s.chunk_hist.values()) == s.batches
    assert 0 <= s.sample_estimate_mismatch <= s.samples


def test_split_excludes_score_zero_and_is_fixed_by_seed(ds):
    c = cfg()
    sp = split_dataset(ds, c, seed=SEED)
    score = np.array(ds.table.column("score").to_pylist())
    assert sp.excluded == int((score == 0).sum()) > 0
    assert not set(sp.validation) & set(sp.train)
    assert set(sp.validation) | set(sp.train) == set(np.flatnonzero(score != 0).tolist())
    assert len(sp.validation) == 8 and len(sp.stable) == 16 and set(sp.stable) <= set(sp.train)
    again = split_dataset(ds, c, seed=SEED)
    assert np.array_equal(sp.validation, again.validation) and np.array_equal(sp.stable, again.stable)
    assert not np.array_equal(sp.validation, split_dataset(ds, c, seed=SEED + 1).validation)
    keep0 = split_dataset(ds, cfg(exclude_score_zero=False), seed=SEED)
    assert keep0.excluded == 0 and len(keep0.train) + len(keep0.validation) == len(ds)
    capped = split_dataset(ds, cfg(validation_size=2048), seed=SEED)
    assert len(capped.validation) == len(score[score != 0]) // 10


class _Table:
    """The part of a LatentDataset the split reads: ids (in id order, as a dataset's rows are, unless
    `order` is False) and a fixed score per id (some 0s, which are excluded)."""

    def __init__(self, ids: list[str], order: bool = True):
        ids = sorted(ids) if order else list(ids)
        self.table = pa.table({"id": ids, "score": [int(i[-2:], 16) % 10 for i in ids]})


def test_split_is_by_image_id_and_adding_images_moves_no_old_one():
    rng = np.random.default_rng(7)
    old_ids = [f"{rng.integers(1 << 62):016x}" for _ in range(600)]
    new_ids = [f"{rng.integers(1 << 62):016x}" for _ in range(400)]
    c = cfg(validation_size=40, stable_size=30)
    old = _Table(old_ids)
    first = split_dataset(old, c, seed=SEED)
    assert len(first.validation) == 40 and first.threshold >= 0

    def side(ds, sp) -> dict[str, str]:
        ids = ds.table.column("id").to_pylist()
        out = {ids[r]: "val" for r in sp.validation}
        out.update({ids[r]: "train" for r in sp.train})
        return out

    before = side(old, first)
    grown = _Table(old_ids + new_ids)
    moved_rows = sum(
        a != b
        for a, b in zip(
            old.table.column("id").to_pylist(), grown.table.column("id").to_pylist(), strict=False
        )
    )
    assert moved_rows > 500  # the new ids interleave: old images sit at other row positions now
    # resumed run (the checkpoint's cutoff): every old image keeps its side; new ones are split alike
    resumed = side(grown, split_dataset(grown, c, seed=SEED, threshold=first.threshold))
    assert {i: resumed[i] for i in before} == before
    new_val = sum(resumed[i] == "val" for i in new_ids if i in resumed)
    assert 0 < new_val < 60  # ~ 40/540 of the new usable images
    # a fresh split of the grown dataset never puts a formerly trained image into validation
    fresh = side(grown, split_dataset(grown, c, seed=SEED))
    assert not [i for i, s in before.items() if s == "train" and fresh[i] == "val"]
    # the same ids in another row order give the same split; another seed another one
    shuffled = _Table(old_ids[::-1], order=False)
    assert side(shuffled, split_dataset(shuffled, c, seed=SEED)) == before
    assert side(old, split_dataset(old, c, seed=SEED + 1)) != before


@pytest.mark.parametrize("world", [1, 2])
def test_eval_batches_deterministic_complete_homogeneous(ds, world):
    c = cfg()
    idx = split_dataset(ds, c, seed=SEED).stable
    runs = [
        [
            b
            for r in range(world)
            for b in eval_batches(ds, idx, c, rank=r, world_size=world, device_batch_size=3, seed=SEED)
        ]
        for _ in range(2)
    ]
    assert all(same(a, b) for a, b in zip(*runs, strict=True))
    used = sorted(i for b in runs[0] for i in b.indices.tolist())
    assert used == sorted(idx.tolist())
    for b in runs[0]:
        assert len({tuple(t) for t in b.target_size.tolist()}) == 1 and b.epoch == EVAL_EPOCH
    single = [b for b in eval_batches(ds, idx, c, rank=0, world_size=1, device_batch_size=3, seed=SEED)]
    prompts = {i: p for b in single for i, p in zip(b.indices.tolist(), b.prompts, strict=True)}
    assert prompts == {i: p for b in runs[0] for i, p in zip(b.indices.tolist(), b.prompts, strict=True)}


def test_loader_applies_the_alias_table(ds, tmp_path):
    aliases = tmp_path / "aliases.json"
    aliases.write_text(
        "\n".join(
            json.dumps({"antecedent_name": f"alias_{k}", "consequent_name": f"tag_{k}", "status": "active"})
            for k in range(40)
        )
    )
    c = cfg(
        prompt={
            "tag_prob": 1.0,
            "alias_prob": 0.5,
            "aliases_path": str(aliases),
            "underscore_weights": [1, 0, 0],
        }
    )
    lo = TrainLoader(ds, c, rank=0, world_size=1, seed=SEED, device_batch_size=4)
    table = AliasTable.load(aliases)
    est = row_token_estimates(ds.table, c.prompt)
    rows = ds.table.to_pylist()
    b = next(iter(lo))
    for j, i in enumerate(b.indices.tolist()):
        meta = SampleMeta.from_row(i, rows[i], n_tokens=int(est[i]))
        assert b.prompts[j] == synthesize(meta, c.prompt, (SEED, 0, i), table)
    assert any("alias_" in p for p in b.prompts)


def test_collate_and_batch_transfer():
    samples = [
        Sample(i, torch.full((4, 2, 3), float(i), dtype=torch.float16), p, (10, 20), (1, 2), (16, 24))
        for i, p in enumerate(["", "a photo of a dog"])
    ]
    b = collate(samples)
    assert b.te1_ids.shape == (2, 1, 77) and b.n_tokens.tolist() == [0, 5]
    assert b.te1_ids[0, 0, :3].tolist() == [49406, 49407, 49407] and b.te2_ids[0, 0, :3].tolist() == [
        49406,
        49407,
        0,
    ]
    moved = b.to("cpu")
    assert torch.equal(moved.latents, b.latents) and moved.prompts == b.prompts
    bad = [*samples, Sample(2, torch.zeros(4, 3, 3, dtype=torch.float16), "x", (1, 1), (0, 0), (24, 24))]
    with pytest.raises(Exception, match="differ in shape"):
        collate(bad)


def test_dataset_cli_preview_and_batches(ds, capsys):
    from bigasp.cli import main

    main(["dataset", "preview", ds.root_url, "--n", "5", "--epoch", "1", "--set", "seed=3"])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
    assert len(lines) == 5
    main(
        [
            "dataset",
            "batches",
            ds.root_url,
            "--set",
            "device_batch_size=2",
            "--set",
            "validation_size=8",
            "--json",
            "--epochs",
            "2",
        ]
    )
    r = json.loads(capsys.readouterr().out)
    assert r["device_batch_size"] == 2 and len(r["epochs"]) == 2
    a = r["actual"]
    assert sum(a["chunks_per_batch"].values()) == a["batches_checked"] > 0
    assert 0 <= a["sample_estimate_mismatch_rate"] <= 1
    e0 = r["epochs"][0]
    assert e0["batches"] * 2 + e0["dropped_samples"] == r["train_rows"]


@pytest.mark.gpu
def test_pinned_batch_reaches_the_gpu_unchanged():
    samples = [
        Sample(i, torch.full((4, 2, 3), float(i), dtype=torch.float16), "a dog", (10, 20), (1, 2), (16, 24))
        for i in range(3)
    ]
    b = collate(samples).pin_memory()
    assert b.latents.is_pinned() and b.te1_ids.is_pinned()
    g = b.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert (
        g.latents.is_cuda
        and torch.equal(g.latents.cpu(), b.latents)
        and torch.equal(g.te2_ids.cpu(), b.te2_ids)
    )
    assert g.prompts == b.prompts


def test_tag_only_rows_draw_the_tag_count_from_the_v1_normal():
    """A row without a caption has no caption length to match: through the loader's path (which passes
    every row's token estimate) its tag count is max(min_tags, int(x)), x ~ Normal(32, 19.8), capped by
    the tags it has. Chi-square goodness of fit against scipy's normal CDF on 8,000 keyed draws."""
    from scipy import stats

    from bigasp.train.data import synthesize_rows

    n_rows, n_tags = 8_000, 120
    tags = [f"tag_{k:03d}" for k in range(n_tags)]
    strs = pa.list_(pa.string())
    table = pa.table({"captions": pa.array([[]] * n_rows, strs), "tags": pa.array([tags] * n_rows, strs)})
    c = cfg(prompt={"ucg_rate": 0.0, "quality": "none", "underscore_weights": [1, 0, 0]})
    est = row_token_estimates(table, c.prompt)
    assert (est > 0).all()  # the loader does hand these rows an estimate; it must not be matched
    prompts, _ = synthesize_rows(table, np.arange(n_rows), seed=SEED, epoch=0, cfg=c, token_estimates=est)
    counts = np.array([len(p.replace(", ", ",").split(",")) for p in prompts])
    assert counts.min() == 5 and counts.max() > 90  # the old path gave min(120, 32) = 32 every time

    # P(count = k): int() truncates toward zero, so count 5 <=> x < 6; the top bin takes x >= n_tags
    normal = stats.norm(c.prompt.tag_count_mean, c.prompt.tag_count_std)
    ks = np.arange(5, n_tags + 1)
    pmf = normal.cdf(ks + 1.0) - normal.cdf(ks.astype(float))
    pmf[0], pmf[-1] = normal.cdf(6.0), normal.sf(float(n_tags))
    observed = np.bincount(counts - 5, minlength=len(ks)).astype(float)
    # merge neighbouring counts until each cell expects >= 20 draws (chi-square's validity condition)
    obs_cells, exp_cells, o, e = [], [], 0.0, 0.0
    for ob, p in zip(observed, pmf * n_rows, strict=True):
        o, e = o + ob, e + p
        if e >= 20:
            obs_cells.append(o)
            exp_cells.append(e)
            o = e = 0.0
    exp_cells[-1] += e
    obs_cells[-1] += o
    result = stats.chisquare(obs_cells, np.array(exp_cells) * sum(obs_cells) / sum(exp_cells))
    assert result.pvalue > 1e-3, (result, len(obs_cells))
    # the match path is still used when there is a caption: same rows with one caption -> int(n/2.5)
    with_caption = pa.table({"captions": [["a caption"]] * 50, "tags": [tags] * 50})
    fixed = np.full(50, 50, dtype=np.int32)
    matched, _ = synthesize_rows(
        with_caption, np.arange(50), seed=SEED, epoch=0, cfg=cfg(prompt={**c.prompt.model_dump(), "tag_prob": 1.0}),
        token_estimates=fixed,
    )  # fmt: skip
    assert {len(p.replace(", ", ",").split(",")) for p in matched} == {20}
