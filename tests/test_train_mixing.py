"""Dataset mixing ([data.mix]): the trained proportions match the configured weights (chi-square
over >= 10k planned samples, and the unmixed order fails the same test), repeats give exact
per-epoch counts with a fresh fractional part each epoch, the order resumes exactly, repeated
copies get their own noise keys, a mixed training run resumes bitwise, and `bigasp dataset
batches` shows the mix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from bigasp.cli import main
from bigasp.config import validate
from bigasp.errors import ConfigError
from bigasp.store import LatentDataset
from bigasp.train.data import DataConfig, TrainLoader
from bigasp.train.synthetic import write_synthetic_latent_dataset
from bigasp.train.trainer import train
from train_helpers import first_planned_rows, make_cfg, weights

# 10 rows per cycle: 6 photo, 3 anime, 1 render
SOURCES = ("photo",) * 6 + ("anime",) * 3 + ("render",)
WEIGHTS = {"photo": 0.2, "anime": 0.3, "render": 0.5}


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    return write_synthetic_latent_dataset(tmp_path_factory.mktemp("big") / "ds", n=4000, sources=SOURCES)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_synthetic_latent_dataset(tmp_path_factory.mktemp("small") / "ds", n=40, sources=SOURCES)


def data_cfg(dataset: Path, **mix) -> DataConfig:
    raw = {"dataset": str(dataset), "seed": 5, "device_batch_size": 4, "num_workers": 0}
    raw |= {"validation_size": 0, "stable_size": 0, "mix": mix}
    return validate(DataConfig, raw)


def first_samples_by_source(loader: TrainLoader, n: int) -> np.ndarray:
    """Per source, how many of the first `n` planned training samples (rank 0 of 1) came from it."""
    source = np.array(loader.dataset.table.column("source").to_pylist())
    taken = source[first_planned_rows(loader, n)]
    return np.array([(taken == s).sum() for s in WEIGHTS])


def test_weights_give_the_configured_proportions_chi_square(big):
    ds = LatentDataset(big)
    n = 10_000  # 2.5 epochs: the last half epoch is a random part of a shuffled epoch
    mixed = first_samples_by_source(TrainLoader(ds, data_cfg(big, weights=WEIGHTS)), n)
    expected = np.array(list(WEIGHTS.values())) * n
    assert mixed.sum() == n
    assert stats.chisquare(mixed, expected).pvalue > 1e-3
    # The same test has power: the unmixed order (60/30/10) is rejected outright.
    plain = first_samples_by_source(TrainLoader(ds, data_cfg(big)), n)
    assert stats.chisquare(plain, expected).pvalue < 1e-9
    # Ten seeds' first 1,000 samples: the p-values of a correct mix are uniform (KS test).
    pvalues = []
    for seed in range(10):
        cfg = data_cfg(big, weights=WEIGHTS).model_copy(update={"seed": 100 + seed})
        counts = first_samples_by_source(TrainLoader(ds, cfg), 1000)
        pvalues.append(stats.chisquare(counts, np.array(list(WEIGHTS.values())) * 1000).pvalue)
    assert stats.kstest(pvalues, "uniform").pvalue > 1e-3


def test_repeats_count_exactly_and_draw_a_fresh_fraction_each_epoch(small):
    loader = TrainLoader(LatentDataset(small), data_cfg(small, repeats={"render": 2.5, "photo": 0}))
    source = np.array(loader.dataset.table.column("source").to_pylist())
    fractional = []
    for epoch in range(3):
        plan = loader.plan(epoch)
        entries = plan.order  # the whole epoch's multiset (before dropping bucket tails)
        rows = entries & ((1 << 40) - 1)
        copies = entries >> 40
        # render: 4 images x 2.5 = 10 entries; anime: 12 x 1; photo: 0
        assert sorted(np.unique(source[rows], return_counts=True)[1].tolist()) == [10, 12]
        assert (source[rows] != "photo").all()
        render = rows[source[rows] == "render"]
        assert np.bincount(render).max() == 3 and copies.max() == 2
        fractional.append(tuple(sorted(rows[copies == 2].tolist())))
    assert len(set(fractional)) > 1  # a different random half of the images gets the third copy


def test_mixed_order_resumes_exactly(small):
    ds = LatentDataset(small)
    cfg = data_cfg(small, weights={"photo": 1, "anime": 1, "render": 2})
    full = TrainLoader(ds, cfg)
    it = iter(full)
    stream = [next(it) for _ in range(20)]  # ~2 epochs of 10 batches: crosses an epoch boundary
    it.close()
    cut = TrainLoader(ds, cfg)
    it = iter(cut)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(cut.state_dict()))
    it.close()
    resumed = TrainLoader(ds, cfg)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for want in stream[7:]:
        got = next(it)
        assert got.indices.tolist() == want.indices.tolist() and got.prompts == want.prompts
        for a, b in ((got.copies, want.copies),):
            assert (a is None and b is None) or torch.equal(a, b)
    it.close()
    assert any(b.copies is not None for b in stream)  # render's images do repeat within an epoch


def test_a_mixed_training_run_resumes_bitwise(tmp_path, small):
    mix = {"mix": {"repeats": {"render": 3.5}}}
    full = train(make_cfg(tmp_path / "full", small, data=mix))
    cfg = make_cfg(tmp_path / "cut", small, data=mix)
    assert train(cfg, stop_at=8).samples_seen == 8
    second = train(cfg, resume="auto")
    a, b = weights(full.last_checkpoint), weights(second.last_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_copies_of_an_image_get_their_own_noise_key():
    from bigasp.train.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.seed = 1
    assert t.noise_keys(0, [7, 7], None) == [(1, "noise", 0, 7), (1, "noise", 0, 7)]
    assert t.noise_keys(0, [7, 7], torch.tensor([0, 1])) == [(1, "noise", 0, 7), (1, "noise", 0, 7, 1)]


def test_bad_mix_configs_name_the_key(small):
    ds = LatentDataset(small)
    with pytest.raises(ConfigError, match=r"data.mix.weights does not name group\(s\) \['render'\]"):
        TrainLoader(ds, data_cfg(small, weights={"photo": 1, "anime": 1}))
    with pytest.raises(ConfigError, match=r"data.mix.repeats names \['cartoon'\]"):
        TrainLoader(ds, data_cfg(small, repeats={"cartoon": 2}))
    with pytest.raises(Exception, match="not both"):
        data_cfg(small, weights={"photo": 1}, repeats={"photo": 1})


def test_dataset_batches_shows_the_mix(small, capsys):
    main(["dataset", "batches", str(small), "--set", "validation_size=0", "--set", "device_batch_size=2",
          "--set", "mix.weights={photo = 1, anime = 1, render = 2}"])  # fmt: skip
    out = capsys.readouterr().out
    assert "mix by source" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("render"))
    assert "50.0%" in line  # render's planned share: weight 2 of 4


def test_kohya_folder_repeats_recorded_at_ingest_become_source_repeats():
    """Ingest records kohya `N_name` folders as source = name and `repeats` = N in `extra`; with no
    [data.mix] set, those images appear N times per epoch, and an explicit mix overrides them."""
    import pyarrow as pa

    from bigasp.train.mixing import MixConfig, build_mix
    from bigasp.train.sampler import build_row_buckets

    table = pa.table({
        "source": ["cats"] * 4 + ["dogs"] * 2 + [None] * 3,
        "extra": ['{"repeats": 3}'] * 4 + ['{"repeats": 10, "x": 1}'] * 2 + ["{}"] * 3,
    })  # fmt: skip
    rows = np.arange(len(table))
    buckets = build_row_buckets(rows, np.full(9, 64), np.full(9, 64), np.ones(9, np.int64))
    mix = build_mix(table, buckets, MixConfig())
    assert dict(zip(mix.names, mix.counts().tolist(), strict=True)) == {"": 3, "cats": 12, "dogs": 20}
    assert build_mix(table, buckets, MixConfig(ingest_repeats=False)) is None
    explicit = build_mix(table, buckets, MixConfig(repeats={"cats": 1}))
    assert dict(zip(explicit.names, explicit.counts().tolist(), strict=True))["dogs"] == 2
    clash = table.set_column(1, "extra", pa.array(['{"repeats": 3}'] * 3 + ['{"repeats": 2}'] + ["{}"] * 5))
    with pytest.raises(ConfigError, match="different kohya repeats"):
        build_mix(clash, buckets, MixConfig())
