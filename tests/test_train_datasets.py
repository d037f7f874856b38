"""Several datasets in one run (`data.dataset` as a list): rows concatenate in the configured
order and every read goes to the right member; `[data.mix] by = "dataset"` gives the configured
proportions (chi-square over >= 10k planned samples, and the unmixed order fails it); the split
is drawn across datasets by id hash, and an id in two datasets keeps both rows on one side; the
order is identical on 2 ranks; a training run from two datasets resumes bitwise, also with one of
them on a local S3 server; datasets that disagree on the latent encoding are refused naming both
and the field; `bigasp dataset info/batches/preview --config` show each dataset and the mix."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from bigasp.cli import main
from bigasp.config import validate
from bigasp.errors import ConfigError, DataError
from bigasp.store import LatentDataset
from bigasp.store.multi import MultiDataset
from bigasp.train.data import DataConfig, TrainLoader, id_hashes, open_dataset
from bigasp.train.datasets import dataset_specs
from bigasp.train.synthetic import write_synthetic_latent_dataset
from bigasp.train.trainer import train
from train_helpers import first_planned_rows, make_cfg, weights

ENC = {"vae_id": "vae-a", "scaling_factor": 0.13025, "seed": 0, "latent": "sample"}


def write(root: Path, n: int, prefix: str, seed: int = 0, **header) -> Path:
    return write_synthetic_latent_dataset(root, n=n, seed=seed, id_prefix=prefix, header=ENC | header)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A 'photo' dataset of 24 images and an 'anime' one of 12 (distinct ids, other latents)."""
    d = tmp_path_factory.mktemp("pair")
    return write(d / "photo", 24, "p"), write(d / "anime", 12, "a", seed=1)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("big")
    return write(d / "photo", 3000, "p"), write(d / "anime", 1000, "a", seed=1)


def data_cfg(datasets, **data) -> DataConfig:
    raw = {"dataset": [str(d) for d in datasets], "seed": 5, "device_batch_size": 4, "num_workers": 0}
    return validate(DataConfig, raw | {"validation_size": 0, "stable_size": 0} | data)


def test_rows_concatenate_in_order_and_reads_go_to_their_dataset(pair):
    photo, anime = LatentDataset(pair[0]), LatentDataset(pair[1])
    ds = open_dataset(data_cfg(pair))
    assert isinstance(ds, MultiDataset) and ds.names == ["photo", "anime"] and len(ds) == 36
    assert ds.table.column("id").to_pylist() == photo.table["id"].to_pylist() + anime.table["id"].to_pylist()
    assert ds.table.column("dataset").to_pylist() == ["photo"] * 24 + ["anime"] * 12
    for i, (member, j) in enumerate([(photo, j) for j in range(24)] + [(anime, j) for j in range(12)]):
        assert torch.equal(ds.read_latent(i), member.read_latent(j))
        assert ds.crop_of(i) == member.crop_of(j) and ds.read_bytes(i) == member.read_bytes(j)
    assert len({ds.rec(i) for i in range(36)}) == 36  # record numbers are distinct across datasets
    assert ds.complete_generations() == 1 and ds.refresh_variants() == 1
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker gets
    assert torch.equal(clone.read_latent(30), anime.read_latent(6))
    with pytest.raises(IndexError):
        ds.read_latent(36)
    # a single path is one LatentDataset, as before; grouped by dataset, a MultiDataset of one
    assert isinstance(open_dataset(validate(DataConfig, {"dataset": str(pair[0])})), LatentDataset)
    one = open_dataset(validate(DataConfig, {"dataset": str(pair[0]), "mix": {"by": "dataset"}}))
    assert isinstance(one, MultiDataset) and one.names == ["photo"] and len(one) == 24


def test_dataset_names_default_to_folders_and_are_told_apart():
    cfg = validate(
        DataConfig,
        {"dataset": ["/a/train", "/b/train/", {"path": "s3://bucket/anime", "storage_options": {"anon": True}},
                     {"path": "/c/x", "name": "train-2"}], "storage_options": {"key": "k"}},
    )  # fmt: skip
    specs = dataset_specs(cfg)
    assert [s.name for s in specs] == ["train", "train-3", "anime", "train-2"]
    assert [s.storage_options for s in specs] == [{"key": "k"}, {"key": "k"}, {"anon": True}, {"key": "k"}]
    assert specs[2].key == "data.dataset[2]"
    dup = validate(DataConfig, {"dataset": [{"path": "/a", "name": "x"}, {"path": "/b", "name": "x"}]})
    with pytest.raises(
        ConfigError, match=r"data.dataset\[1\].name = 'x' is also the name of data.dataset\[0\]"
    ):
        dataset_specs(dup)
    with pytest.raises(ConfigError, match=r"data\.dataset is not set"):
        dataset_specs(validate(DataConfig, {"dataset": []}))


def first_samples_by_dataset(loader: TrainLoader, n: int) -> np.ndarray:
    member = loader.dataset.member_of_rows()
    return np.bincount(member[first_planned_rows(loader, n)], minlength=2)


def test_weights_by_dataset_give_the_configured_proportions_chi_square(big):
    n, w = 10_000, {"photo": 0.35, "anime": 0.65}
    cfg = data_cfg(big, validation_size=200, mix={"by": "dataset", "weights": w})
    loader = TrainLoader(open_dataset(cfg), cfg)
    counts = first_samples_by_dataset(loader, n)
    expected = np.array([w["photo"], w["anime"]]) * n
    assert counts.sum() == n and stats.chisquare(counts, expected).pvalue > 1e-3
    plain = data_cfg(big, validation_size=200)
    unmixed = first_samples_by_dataset(TrainLoader(open_dataset(plain), plain), n)  # 75% / 25%
    assert stats.chisquare(unmixed, expected).pvalue < 1e-9
    # the split is drawn across both datasets by id hash: the 200 smallest hashes of all 4000 ids
    ids = loader.dataset.table.column("id")
    smallest = np.sort(np.argsort(id_hashes(ids, seed=5), kind="stable")[:200])
    assert loader.split.validation.tolist() == smallest.tolist()
    assert set(loader.dataset.member_of_rows(loader.split.validation).tolist()) == {0, 1}
    # repeats by dataset: exact counts per epoch
    rcfg = data_cfg(big, mix={"by": "dataset", "repeats": {"anime": 3}})
    mix = TrainLoader(open_dataset(rcfg), rcfg).mix
    assert dict(zip(mix.names, mix.counts().tolist(), strict=True)) == {"anime": 3000, "photo": 3000}


def test_an_image_in_two_datasets_is_two_rows_on_one_side_of_the_split(tmp_path):
    a = write(tmp_path / "a", 40, "img")
    b = write(tmp_path / "b", 40, "img", seed=1)  # the same 40 ids, other latents (e.g. other captions)
    cfg = data_cfg([a, b], validation_size=8, stable_size=4)
    ds = open_dataset(cfg)
    assert len(ds) == 80 and ds.shared_ids == 40 and ds.names == ["a", "b"]
    split = TrainLoader(ds, cfg).split
    held = set(split.validation.tolist())
    assert len(held) == 8 and all((r + 40) % 80 in held for r in held)  # both copies held out together
    assert not held & set(split.train.tolist())


def test_two_rank_order_is_the_one_rank_order(pair):
    cfg = data_cfg(pair, device_batch_size=2, mix={"by": "dataset", "weights": {"photo": 1, "anime": 1}})
    one = iter(TrainLoader(open_dataset(cfg), cfg))
    ranks = [iter(TrainLoader(open_dataset(cfg), cfg, rank=r, world_size=2)) for r in range(2)]
    for _ in range(6):
        for r in range(2):
            got, want = next(ranks[r]), next(one)
            assert got.indices.tolist() == want.indices.tolist() and got.prompts == want.prompts
            assert torch.equal(got.latents, want.latents)
    for it in (one, *ranks):
        it.close()


MIX = {"mix": {"by": "dataset", "repeats": {"anime": 2.5}}}


def test_training_from_two_datasets_resumes_bitwise(tmp_path, pair):
    data = {"dataset": [str(p) for p in pair], **MIX}
    full = train(make_cfg(tmp_path / "full", pair[0], data=data))
    cfg = make_cfg(tmp_path / "cut", pair[0], data=data)
    assert train(cfg, stop_at=8).samples_seen == 8
    second = train(cfg, resume="auto")
    a, b = weights(full.last_checkpoint), weights(second.last_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [
        r for line in (tmp_path / "full" / "batches.rank0.jsonl").open() for r in json.loads(line)["rows"]
    ]
    assert min(rows) < 24 <= max(rows)  # trained on both datasets
    # the list is part of the run: resuming with it reordered is refused, before any step
    swapped = make_cfg(tmp_path / "cut", pair[0], data={**data, "dataset": [str(pair[1]), str(pair[0])]})
    with pytest.raises(DataError, match=r"saved training on the datasets \['photo', 'anime'\] in that order"):
        train(swapped, resume="auto")


def test_datasets_that_disagree_on_the_encoding_are_refused(tmp_path, pair):
    cases = {
        "scaling_factor": {"scaling_factor": 0.18215},
        "latent": {"latent": "mean"},
        "vae_id": {"vae_id": "vae-b"},
    }
    for field, header in cases.items():
        other = write(tmp_path / field, 8, "o", **header)
        with pytest.raises(DataError) as err:
            open_dataset(data_cfg([pair[0], other]))
        msg = str(err.value)
        assert f"differ in {field}" in msg and str(pair[0]) in msg and str(other) in msg and "\n" not in msg
    # a VAE variant is allowed with check_vae = false (as for one dataset); the scaling factor never is
    assert len(open_dataset(data_cfg([pair[0], tmp_path / "vae_id"], check_vae=False))) == 32
    with pytest.raises(DataError, match="differ in scaling_factor"):
        open_dataset(data_cfg([pair[0], tmp_path / "scaling_factor"], check_vae=False))
    # the encode seed may differ
    assert len(open_dataset(data_cfg([pair[0], write(tmp_path / "seed", 8, "s", seed=9)]))) == 32


def test_preflight_names_the_list_item_that_is_not_a_dataset(tmp_path, pair):
    from bigasp.train.preflight import check_sources

    cfg = make_cfg(tmp_path / "run", pair[0], data={"dataset": [str(pair[0]), str(tmp_path / "nope")]})
    with pytest.raises(ConfigError, match=r"data.dataset\[1\] = '.*nope': .*not a bigasp dataset"):
        check_sources(cfg)


def test_dataset_commands_on_a_config_with_two_datasets(tmp_path, pair, capsys):
    run = tmp_path / "run.toml"
    run.write_text(
        f'[data]\ndataset = [{json.dumps(str(pair[0]))}, {{path = {json.dumps(str(pair[1]))}, name = "anime"}}]\n'
        "validation_size = 0\ndevice_batch_size = 2\n"
        '[data.mix]\nby = "dataset"\nweights = {photo = 1, anime = 3}\n'
    )
    main(["dataset", "batches", "--config", str(run)])
    out = capsys.readouterr().out
    assert "dataset photo" in out and "rows 24-35" in out and "mix by dataset" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("anime ") and "%" in x)
    assert "75.0%" in line  # anime's planned share: weight 3 of 4
    main(["dataset", "preview", "--config", str(run), "--n", "12"])
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 12 and any(" anime:a0" in x for x in shown) and any(" photo:p0" in x for x in shown)
    main(["dataset", "info", "--config", str(run), "--json"])
    infos = json.loads(capsys.readouterr().out)
    assert [(d["name"], d["latents"]) for d in infos] == [("photo", 24), ("anime", 12)]
    main(["dataset", "info", "--config", str(run)])
    assert "2 datasets trained as one: 36 latents (photo 24, anime 12)" in capsys.readouterr().out


def test_preflight_checks_each_dataset(tmp_path, pair):
    from bigasp.store.manifest import init_dataset
    from bigasp.train.preflight import check_dataset

    empty = tmp_path / "empty"
    empty.mkdir()
    init_dataset(empty)
    cfg = make_cfg(tmp_path / "run", pair[0], data={"dataset": [str(pair[0]), str(empty)]})
    with pytest.raises(DataError, match=rf"^{empty} holds no images"):
        check_dataset(open_dataset(cfg.data), None, cfg)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port (as in test_object_storage); yields its fsspec options."""
    import os

    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    from train_helpers import free_port

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                     "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():  # fmt: skip
            mp.setenv(k, v)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        opts = {"endpoint_url": f"http://{host}:{port}", "use_listings_cache": False}
        s3fs.S3FileSystem(**opts).mkdir("multi")
        try:
            yield opts
        finally:
            server.stop()


def test_one_dataset_in_a_bucket_and_one_local_train_as_two_local(tmp_path, pair, s3):
    import s3fs

    s3fs.S3FileSystem(**s3).put(str(pair[1]), "multi/anime", recursive=True)
    ref = train(make_cfg(tmp_path / "ref", pair[0], data={"dataset": [str(p) for p in pair], **MIX}))
    bucket = {"path": "s3://multi/anime", "storage_options": s3}  # its own options; the local one has none
    data = {
        "dataset": [str(pair[0]), bucket],
        "cache_dir": str(tmp_path / "cache"),
        "prefetch_batches": 2,
        "num_workers": 1,  # a forked worker makes its own S3 client
        **MIX,
    }
    cut = make_cfg(tmp_path / "cut", pair[0], data=data)
    assert train(cut, stop_at=8).samples_seen == 8
    second = train(cut, resume="auto")
    a, b = weights(ref.last_checkpoint), weights(second.last_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any((tmp_path / "cache").rglob("*-*-*-*"))  # the bucket's latents came through the cache
