"""`bigasp train` names the config key of a bad dataset path or missing model source before loading a model."""

from __future__ import annotations

import pytest

from bigasp.config import dump_toml
from bigasp.train.synthetic import write_synthetic_latent_dataset


def _run(tmp_path, capsys, dataset: str, source: str) -> str:
    from bigasp.cli import main

    cfg = tmp_path / "run.toml"
    cfg.write_text(dump_toml({"run_dir": str(tmp_path / "run"), "model": {"source": source},
                              "data": {"dataset": dataset}, "train": {"device": "cpu"}}))  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(["train", str(cfg)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_bad_dataset_path_is_named_by_its_key_before_the_model_loads(tmp_path, capsys):
    broken_model = tmp_path / "model"
    (broken_model / "unet").mkdir(parents=True)  # loading it would fail with another message
    err = _run(tmp_path, capsys, str(tmp_path / "nowhere"), str(broken_model))
    assert "data.dataset" in err and "nowhere" in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_unset_dataset_is_named(tmp_path, capsys):
    assert "data.dataset is not set" in _run(tmp_path, capsys, "", "tiny")


def test_missing_model_source_is_named_by_its_key(tmp_path, capsys):
    ds = write_synthetic_latent_dataset(tmp_path / "ds", n=2, seed=0)
    err = _run(tmp_path, capsys, str(ds), str(tmp_path / "no-such-model"))
    assert "model.source" in err and "no-such-model" in err and "does not exist" in err
