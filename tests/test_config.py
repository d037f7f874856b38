"""The config mechanism every stage uses: TOML + `dotted.key=value` overrides, strict validation."""

from __future__ import annotations

import tomllib
from typing import Literal

import pytest
from pydantic import Field, ValidationError

from bigasp.config import Section, apply_overrides, dump_toml, load_config, parse_override
from bigasp.errors import ConfigError


class Optim(Section):
    lr: float = Field(1e-4, description="peak learning rate")
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], description="AdamW betas")


class Train(Section):
    precision: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="autocast dtype")
    steps: int = Field(100, ge=1, description="optimizer steps")
    optim: Optim = Field(default_factory=Optim)


class RunConfig(Section):
    name: str = Field("run", description="run name")
    seed: int = Field(42, description="run seed")
    output: str | None = Field(None, description="output dir")
    train: Train = Field(default_factory=Train)


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("train.optim.lr=2e-4", ["train", "optim", "lr"], 2e-4),
        ('train.precision="fp16"', ["train", "precision"], "fp16"),
        ("train.precision=fp16", ["train", "precision"], "fp16"),  # bare word -> string
        ("train.optim.betas=[0.9, 0.95]", ["train", "optim", "betas"], [0.9, 0.95]),
        ("seed=7", ["seed"], 7),
        ("flag=true", ["flag"], True),
        ("output=/data/run=3", ["output"], "/data/run=3"),  # only the first '=' splits
        (" seed = 7", ["seed"], 7),  # key and TOML value may carry spaces
    ],
)
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize("bad", ["train.lr", "=3"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError, match="override"):
        parse_override(bad)


def test_apply_overrides_copies_and_creates_tables():
    data = {"train": {"steps": 5}}
    out = apply_overrides(data, ["train.optim.lr=0.1", "seed=3"])
    assert out == {"train": {"steps": 5, "optim": {"lr": 0.1}}, "seed": 3}
    assert data == {"train": {"steps": 5}}  # input untouched
    with pytest.raises(ConfigError, match="'steps' is a value, not a table"):
        apply_overrides(data, ["train.steps.x=1"])


def test_defaults_without_a_file():
    cfg = load_config(RunConfig, None)
    assert cfg.train.precision == "bf16" and cfg.train.optim.lr == 1e-4 and cfg.seed == 42


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('name = "exp1"\n[train]\nsteps = 500\n[train.optim]\nlr = 3e-5\n')
    cfg = load_config(RunConfig, path, ["train.optim.lr=1e-3", "train.precision=fp32"])
    assert cfg.name == "exp1" and cfg.train.steps == 500
    assert cfg.train.optim.lr == 1e-3 and cfg.train.precision == "fp32"


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[train]\nstpes = 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    msg = str(err.value)
    assert str(path) in msg and "train.stpes" in msg and "unknown key" in msg


def test_unknown_key_in_override_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.optim\.learning_rate: unknown key"):
        load_config(RunConfig, None, ["train.optim.learning_rate=1e-4"])


def test_bad_values_name_key_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, None, ["train.precision=fp8", "train.steps=0"])
    msg = str(err.value)
    assert "train.precision" in msg and "'fp32', 'bf16' or 'fp16'" in msg and "'fp8'" in msg
    assert "train.steps" in msg and "greater than or equal to 1" in msg


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML"):
        load_config(RunConfig, bad)


def test_assignment_is_validated():
    cfg = RunConfig()
    with pytest.raises(ValidationError):
        cfg.train.precision = "int4"


def test_dump_toml_round_trips():
    cfg = load_config(RunConfig, None, ['name="a \\"quoted\\" name"', "train.optim.betas=[0.8, 0.9]"])
    text = dump_toml(cfg.model_dump())
    again = RunConfig.model_validate(tomllib.loads(text))
    assert again == cfg
    assert "output" not in text  # None values are omitted (TOML has no null)


def test_dump_toml_is_tomli_w_and_keeps_awkward_strings_and_keys():
    import tomli_w

    data = {
        "path": 'C:\\data\\"photos"\n\ttab ünïcode',
        "weights": {"r/pics": 2.0, "name with space": 1, "dotted.key": [1, 2]},
        "none": None,
        "nested": {"drop": None, "keep": [{"a": 1}, {"b": "x"}]},
    }
    expected = {"path": data["path"], "weights": data["weights"], "nested": {"keep": [{"a": 1}, {"b": "x"}]}}
    text = dump_toml(data)
    assert text == tomli_w.dumps(expected)  # the maintained writer, None values dropped
    assert tomllib.loads(text) == expected


@pytest.mark.parametrize("name", ["bigasp-v2.toml", "bigasp-v2.5.toml", "demo.toml", "tiny.toml"])
def test_resolved_run_configs_round_trip(name):
    """The config.toml saved beside a checkpoint validates back to the very same resolved config."""
    from pathlib import Path

    from bigasp.train.config import RunConfig as TrainRunConfig

    path = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = load_config(TrainRunConfig, path, ['run_dir="runs/a \\"quoted\\" dir"'])
    text = dump_toml(cfg.model_dump(mode="json"))
    again = TrainRunConfig.model_validate(tomllib.loads(text))
    assert again == cfg


def test_other_stage_configs_round_trip():
    from bigasp.prep.config import EncodeConfig, IngestConfig
    from bigasp.sample.generate import GenerateSettings

    for model in (IngestConfig, EncodeConfig, GenerateSettings):
        cfg = model()
        assert model.model_validate(tomllib.loads(dump_toml(cfg.model_dump(mode="json")))) == cfg
