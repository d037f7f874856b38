"""The flow shift: what training records in the model metadata, what generation uses, and
which configs contradict themselves."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from bigasp.config import validate
from bigasp.errors import ConfigError
from bigasp.models import ModelKind
from bigasp.sample.commands import build_settings
from bigasp.sample.generate import resolve_kind
from bigasp.train.config import RunConfig


def run_config(**train) -> dict:
    return {"model": {"source": "tiny"}, "data": {"dataset": "ds"}, "train": train}


@pytest.mark.parametrize(
    ("train", "model", "named"),
    [
        ({"objective": "eps", "flow_shift": 3.0}, {}, "train.flow_shift = 3"),
        ({"objective": "eps"}, {"sampling_shift": 6.0}, "model.sampling_shift = 6"),
    ],
)
def test_eps_config_with_a_shift_is_refused_naming_the_keys(train, model, named):
    raw = run_config(**train)
    raw["model"].update(model)
    with pytest.raises(ConfigError, match=named) as err:
        validate(RunConfig, raw, "run.toml")
    assert "train.objective = 'eps'" in str(err.value)


def test_flow_checkpoints_record_the_training_shift_as_the_sampling_default():
    cfg = validate(RunConfig, run_config(objective="flow", flow_shift=3.0))
    assert cfg.model_kind() == ModelKind("flow", shift=3.0, train_shift=3.0)
    assert validate(RunConfig, run_config(objective="eps")).model_kind() == ModelKind("eps")


def test_sampling_shift_unlike_the_training_shift_is_a_warning_naming_both(caplog):
    raw = run_config(objective="flow", flow_shift=3.0)
    raw["model"]["sampling_shift"] = 1.0
    with caplog.at_level(logging.WARNING):
        cfg = validate(RunConfig, raw)
    assert "model.sampling_shift = 1 differs from train.flow_shift = 3" in caplog.text
    assert cfg.model_kind() == ModelKind("flow", shift=1.0, train_shift=3.0)


def test_model_kind_with_train_shift_round_trips_folder_and_single_file(tmp_path):
    from bigasp.models.single_file import META_KIND, kind_from_metadata

    kind = ModelKind("flow", shift=1.0, train_shift=3.0)
    kind.save(tmp_path)
    assert ModelKind.load(tmp_path) == kind
    assert kind_from_metadata({META_KIND: __import__("json").dumps(kind.to_json())}) == kind
    assert "train_shift" not in ModelKind("flow", 3.0).to_json()  # older readers see the same JSON
    with pytest.raises(Exception, match="train_shift"):
        ModelKind("flow", 1.0, train_shift=float("nan"))


def test_generate_and_watch_use_the_recorded_shift_unless_overridden(caplog):
    recorded = ModelKind("flow", shift=3.0, train_shift=3.0)
    default = build_settings(recorded, "auto")
    assert resolve_kind(recorded, default).shift == 3.0
    flag = build_settings(recorded, "auto", shift=6.0)
    assert resolve_kind(recorded, flag).shift == 6.0
    with caplog.at_level(logging.WARNING):
        build_settings(ModelKind("eps"), "auto", shift=3.0)
    assert "--shift 3 is ignored: this is an eps model" in caplog.text


def test_trainer_writes_the_training_shift_into_the_checkpoint(tmp_path):
    """A real (one-step) flow run: the checkpoint's bigasp_model.json carries both shifts and
    the generator samples it at the recorded one."""
    from bigasp.train.synthetic import write_synthetic_latent_dataset
    from bigasp.train.trainer import train
    from train_helpers import make_cfg

    data = write_synthetic_latent_dataset(tmp_path / "ds", n=8, seed=0)
    cfg = make_cfg(
        tmp_path / "run", data,
        model={"train_text_encoder": False},
        train={"objective": "flow", "flow_shift": 2.5, "batch_size": 2, "max_samples": 2, "warmup_samples": 0},
        checkpoint={"at_end": True},
        logging={"every": 2, "batch_log": False},
    )  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(before)
    (model_json,) = Path(tmp_path / "run").rglob("bigasp_model.json")
    kind = ModelKind.load(model_json.parent)
    assert kind == ModelKind("flow", shift=2.5, train_shift=2.5)
    assert resolve_kind(kind, build_settings(kind, "auto")).shift == 2.5
