"""Sampler/scheduler names as ComfyUI and A1111 users type them map to bigasp's one name each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigasp.errors import ConfigError
from bigasp.sample import GenerateSettings
from bigasp.sample.names import SAMPLERS, SCHEDULERS, normalize_sampler, normalize_scheduler

COMFY = json.loads((Path(__file__).parent / "data" / "comfyui_nodes.json").read_text())["nodes"]["KSampler"]

# AUTOMATIC1111 stable-diffusion-webui modules/sd_samplers_kdiffusion.py, `samplers_k_diffusion`
# (label, aliases) of the samplers bigasp has, copied from the webui source (v1.10).
A1111_SAMPLERS = {
    "euler": ("Euler", ["k_euler"]),
    "dpmpp_2m": ("DPM++ 2M", ["k_dpmpp_2m"]),
    "dpmpp_2m_sde": ("DPM++ 2M SDE", ["k_dpmpp_2m_sde"]),
    "dpmpp_3m_sde": ("DPM++ 3M SDE", ["k_dpmpp_3m_sde"]),
}
# modules/sd_schedulers.py labels (the "Schedule type" dropdown) of the schedules bigasp has.
A1111_SCHEDULES = {
    "normal": "Normal",
    "simple": "Simple",
    "sgm_uniform": "SGM Uniform",
    "beta": "Beta",
    "karras": "Karras",
    "exponential": "Exponential",
}


def test_bigasp_names_are_comfyui_names():
    assert set(SAMPLERS) <= set(COMFY["required"]["sampler_name"]["choices"])
    assert set(SCHEDULERS) <= set(COMFY["required"]["scheduler"]["choices"])
    for name in SAMPLERS:
        assert normalize_sampler(name) == name
    for name in SCHEDULERS:
        assert normalize_scheduler(name) == name


@pytest.mark.parametrize("name", SAMPLERS)
def test_a1111_sampler_labels_and_aliases_in_any_case(name):
    label, aliases = A1111_SAMPLERS[name]
    for spelling in (label, label.lower(), label.upper(), *aliases, f"  {label}  ", label.replace(" ", "-")):
        assert normalize_sampler(spelling) == name, spelling


@pytest.mark.parametrize("name", SCHEDULERS)
def test_a1111_schedule_types(name):
    for spelling in (A1111_SCHEDULES[name], A1111_SCHEDULES[name].lower(), A1111_SCHEDULES[name].upper()):
        assert normalize_scheduler(spelling) == name


@pytest.mark.parametrize(
    ("spelling", "says"),
    [
        ("Euler a", "ancestral"),
        ("euler_ancestral", "ancestral"),
        ("k_euler_a", "ancestral"),
        ("DPM++ 2S a", "ancestral"),
        ("DPM++ 2M Karras", "use sampler dpmpp_2m with scheduler karras"),
        ("k_dpmpp_2m_ka", "use sampler dpmpp_2m with scheduler karras"),
        ("DPM++ 2M SDE Exponential", "use sampler dpmpp_2m_sde with scheduler exponential"),
        ("dpmpp_2m_sde_gpu", "use dpmpp_2m_sde"),
        ("heun", "unknown sampler 'heun'"),
    ],
)
def test_unsupported_samplers_say_why(spelling, says):
    with pytest.raises(ValueError) as e:
        normalize_sampler(spelling)
    assert says in str(e.value)


def test_unknown_scheduler_and_automatic():
    with pytest.raises(ValueError, match="per-sampler default"):
        normalize_scheduler("Automatic")
    with pytest.raises(ValueError, match="choose one of normal"):
        normalize_scheduler("Align Your Steps")


def test_settings_and_cli_accept_the_spellings(tmp_path, capsys):
    from bigasp.cli import main
    from bigasp.sample import read_png_metadata

    s = GenerateSettings(sampler="DPM++ 2M SDE", scheduler="Karras")
    assert (s.sampler, s.scheduler) == ("dpmpp_2m_sde", "karras")
    main(["generate", "a cat", "--model", "tiny", "--size", "64x64", "--steps", "2", "--out", str(tmp_path),
          "--sampler", "Euler", "--scheduler", "SGM Uniform", "--no-progress"])  # fmt: skip
    meta = read_png_metadata(next(tmp_path.glob("*.png")))
    assert (meta["settings"]["sampler"], meta["settings"]["scheduler"]) == ("euler", "sgm_uniform")
    with pytest.raises(SystemExit) as e:
        main(["generate", "a cat", "--model", "tiny", "--out", str(tmp_path), "--sampler", "euler a"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "sampler" in err and "ancestral" in err and len(err.strip().splitlines()) == 1


def test_config_error_type():
    from bigasp.config import validate

    with pytest.raises(ConfigError, match="ancestral"):
        validate(GenerateSettings, {"sampler": "Euler a"}, "flags")


def test_model_commands_take_arch_and_warn_on_preset(tmp_path, caplog, capsys):
    import json as _json

    from bigasp.cli import main
    from bigasp.models.io import save_diffusers_folder
    from bigasp.models.presets import build_preset

    folder = save_diffusers_folder(build_preset("tiny", seed=0), tmp_path / "m")
    main(["model", "export", str(folder), str(tmp_path / "a.safetensors"), "--no-workflow"])
    capsys.readouterr()
    main(["model", "info", str(tmp_path / "a.safetensors"), "--arch", "tiny"])
    assert _json.loads(capsys.readouterr().out)
    with caplog.at_level("WARNING"):
        main(["model", "save", str(tmp_path / "a.safetensors"), str(tmp_path / "b"), "--arch", "tiny"])
    assert "deprecated" not in caplog.text
    with caplog.at_level("WARNING"):
        main(["model", "save", str(tmp_path / "a.safetensors"), str(tmp_path / "c"), "--preset", "tiny"])
    assert "--preset is deprecated" in caplog.text and "use --arch tiny" in caplog.text
    assert (tmp_path / "c" / "unet").is_dir()
    with pytest.raises(SystemExit) as e:
        main(["model", "save", str(tmp_path / "a.safetensors"), str(tmp_path / "d"),
              "--preset", "tiny", "--arch", "sdxl-base"])  # fmt: skip
    assert e.value.code == 2 and "disagree" in capsys.readouterr().err
