"""LoRA at inference: kohya and diffusers files load through diffusers/peft, several at once, and
merge exactly as W + weight * (alpha / rank) * up @ down."""

from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bigasp.errors import ConfigError
from bigasp.models import build_preset
from bigasp.sample.lora import LoraError, LoraSpec, apply_loras, parse_lora
from lora_helpers import RANK, UNET_MOD, te_module, write_diffusers, write_kohya
from test_exports import BIGASP, ENV

pytest.importorskip("peft")


def _weight(model, where: str) -> torch.Tensor:
    part, mod = where.split(".", 1)
    return (
        (model.unet.get_submodule(mod) if part == "unet" else te_module(model, mod)).weight.detach().clone()
    )


def _unet_out(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    c = model.unet.config
    ctx = torch.randn(1, 77, c.cross_attention_dim, generator=g)
    added = {
        "text_embeds": torch.randn(
            1, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, generator=g
        ),
        "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]]),
    }
    with torch.no_grad():
        return model.unet(x, torch.tensor([500]), ctx, added_cond_kwargs=added).sample


@pytest.fixture
def model():
    return build_preset("tiny", seed=0)


def test_weight_zero_leaves_the_model_unchanged(model, tmp_path):
    write_kohya(tmp_path / "k.safetensors", model, seed=1, alpha=1.0)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    out0 = _unet_out(model)
    apply_loras(model, [LoraSpec(tmp_path / "k.safetensors", 0.0)])
    after = model.unet.state_dict()
    assert set(after) == set(before)  # adapter layers removed after the merge
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_unet_out(model), out0)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_merge_equals_manual_merge(model, tmp_path, fmt):
    path = tmp_path / f"{fmt}.safetensors"
    deltas = write_kohya(path, model, 1, alpha=1.0) if fmt == "kohya" else write_diffusers(path, model, 1)
    manual = build_preset("tiny", seed=0)
    for where, delta in deltas.items():
        part, mod = where.split(".", 1)
        target = manual.unet.get_submodule(mod) if part == "unet" else te_module(manual, mod)
        with torch.no_grad():
            target.weight += 0.7 * delta
    apply_loras(model, [LoraSpec(path, 0.7)])
    for where in deltas:
        torch.testing.assert_close(_weight(model, where), _weight(manual, where), rtol=0, atol=1e-6)
    out, ref, base = _unet_out(model), _unet_out(manual), _unet_out(build_preset("tiny", seed=0))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - base).abs().max() > 1e-4  # the LoRA did change the output


def test_several_loras_at_once_add_up(model, tmp_path):
    dk = write_kohya(tmp_path / "k.safetensors", model, 1, alpha=1.0)
    dd = write_diffusers(tmp_path / "d.safetensors", model, 2)
    base = _weight(model, f"unet.{UNET_MOD}")
    apply_loras(
        model, [LoraSpec(tmp_path / "k.safetensors", 0.5), LoraSpec(tmp_path / "d.safetensors", -1.0)]
    )
    want = base + 0.5 * dk[f"unet.{UNET_MOD}"] - 1.0 * dd[f"unet.{UNET_MOD}"]
    torch.testing.assert_close(_weight(model, f"unet.{UNET_MOD}"), want, rtol=0, atol=1e-6)


def test_spec_parsing_and_bad_files(tmp_path, model):
    f = tmp_path / "x.safetensors"
    save_file({"something_else": torch.zeros(2)}, str(f))
    assert parse_lora(str(f)) == LoraSpec(f, 1.0)
    assert parse_lora(f"{f}:0.6") == LoraSpec(f, 0.6)
    assert parse_lora(f"{f}:-1") == LoraSpec(f, -1.0)
    with pytest.raises(ConfigError, match="does not exist"):
        parse_lora(str(tmp_path / "nope.safetensors:0.5"))
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"only \.safetensors"):
        parse_lora(str(tmp_path / "x.pt"))
    with pytest.raises(ConfigError, match="--lora"):
        apply_loras(model, [LoraSpec(f, 1.0)])


def test_cli_generate_with_lora_changes_the_image(tmp_path):
    import numpy as np
    from PIL import Image

    from bigasp.cli import main

    lora = tmp_path / "k.safetensors"
    write_kohya(lora, build_preset("tiny", seed=0), 1, alpha=RANK * 20.0)  # strong, to move the pixels
    common = ["generate", "a cat", "--model", "tiny", "--size", "64x64", "--steps", "2", "--no-progress"]
    main([*common, "--out", str(tmp_path / "plain")])
    main([*common, "--out", str(tmp_path / "zero"), "--lora", f"{lora}:0"])
    main([*common, "--out", str(tmp_path / "lora"), "--lora", f"{lora}:1", "--lora", f"{lora}:0.5"])

    def px(d):
        return np.asarray(Image.open(next((tmp_path / d).glob("*.png"))), dtype=np.int16)

    assert np.array_equal(px("plain"), px("zero"))
    assert np.abs(px("plain") - px("lora")).max() > 0
    from bigasp.sample import read_png_metadata

    png = next((tmp_path / "lora").glob("*.png"))
    meta = read_png_metadata(png)
    assert meta["model"]["loras"] == [{"file": str(lora), "weight": 1.0}, {"file": str(lora), "weight": 0.5}]
    assert 'LoRA: "k: 1, k: 0.5"' in Image.open(png).text["parameters"]
    assert "loras" not in read_png_metadata(next((tmp_path / "plain").glob("*.png")))["model"]


def test_unet_and_text_encoder_strengths_merge_apart(model, tmp_path):
    """FILE:W_MODEL:W_CLIP: the UNet gets W_MODEL, both text encoders W_CLIP (ComfyUI's LoraLoader
    strength_model / strength_clip)."""
    path = tmp_path / "k.safetensors"
    deltas = write_kohya(path, model, 1, alpha=1.0)
    manual = build_preset("tiny", seed=0)
    for where, delta in deltas.items():
        part, mod = where.split(".", 1)
        target = manual.unet.get_submodule(mod) if part == "unet" else te_module(manual, mod)
        with torch.no_grad():
            target.weight += (0.7 if part == "unet" else -0.2) * delta
    spec = parse_lora(f"{path}:0.7:-0.2")
    assert spec == LoraSpec(path, 0.7, -0.2) and spec.clip == -0.2
    apply_loras(model, [spec])
    for where in deltas:
        torch.testing.assert_close(_weight(model, where), _weight(manual, where), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("text", "want"),
    [(":0.5:0.25", (0.5, 0.25)), (":0.5:0.5", (0.5, 0.5)), (":-1", (-1.0, -1.0)), ("", (1.0, 1.0))],
)
def test_lora_spec_weights(tmp_path, text, want):
    f = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(f))
    spec = parse_lora(f"{f}{text}")
    assert (spec.path, spec.weight, spec.clip) == (f, *want)
    with pytest.raises(ConfigError, match="within ±100"):
        parse_lora(f"{f}:1:101")


def _lying(tmp_path, model) -> dict[str, Path]:
    """A good kohya file, then copies whose header lies in the ways a broken download or editor does."""
    good = tmp_path / "good.safetensors"
    write_kohya(good, model, 1, alpha=1.0)
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 64  # a tensor said to end past the data
    lied = json.dumps(header).encode()
    files = {
        "truncated": raw[:-40],
        "header_not_json": raw[:8] + b"{" * n + raw[8 + n :],
        "header_length_absurd": struct.pack("<Q", 10**12) + raw[8:],
        "offset_past_the_data": struct.pack("<Q", len(lied)) + lied + raw[8 + n :],
    }
    out = {}
    for name, data in files.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        out[name] = tmp_path / f"{name}.safetensors"
    return out


def test_lying_headers_get_safetensors_own_reason(model, tmp_path):
    """Not diffusers' generic "Unable to load weights": the file and what is wrong with it."""
    for name, path in _lying(tmp_path, model).items():
        with pytest.raises(LoraError) as err:
            apply_loras(build_preset("tiny", seed=0), [LoraSpec(path, 1.0)])
        msg = str(err.value)
        assert msg.startswith(f"--lora {path} is not a readable .safetensors file: "), (name, msg)
        assert "Error while deserializing header" in msg and "Unable to load weights" not in msg, (name, msg)


def _nan_lora(tmp_path, model) -> tuple[Path, str]:
    path = tmp_path / "nan.safetensors"
    write_kohya(path, model, 1, alpha=1.0)
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if k.startswith("lora_unet") and k.endswith("lora_up.weight"))[0]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(path))
    return path, key


def test_non_finite_lora_weights_name_the_file_and_tensor(model, tmp_path):
    path, key = _nan_lora(tmp_path, model)
    with pytest.raises(LoraError, match=rf"--lora {re.escape(str(path))}: tensor '{key}' holds 1 NaN/inf"):
        apply_loras(model, [LoraSpec(path, 1.0)])


def _sd15_lora(tmp_path) -> tuple[Path, str]:
    """A LoRA for SD 1.5 (kohya's names of its diffusers blocks, 320-wide attention)."""
    path, name = (
        tmp_path / "sd15.safetensors",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    )
    save_file(
        {f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4),
         f"{name}.alpha": torch.tensor(4.0)}, str(path),
    )  # fmt: skip
    return path, "another architecture"


@pytest.mark.parametrize("case", ["offset_past_the_data", "nan", "another_architecture"])
def test_cli_bad_lora_is_one_line_naming_file_and_reason(tmp_path, case):
    """Through the installed command: exit 2, one line, no traceback, nothing written."""
    model = build_preset("tiny", seed=0)
    if case == "nan":
        path, key = _nan_lora(tmp_path, model)
        want = f"tensor '{key}' holds 1 NaN/inf"
    elif case == "another_architecture":
        path, want = _sd15_lora(tmp_path)
    else:
        path, want = (
            _lying(tmp_path, model)[case],
            "is not a readable .safetensors file: Error while deserializing",
        )
    res = subprocess.run(
        [str(BIGASP), "generate", "a cat", "--model", "tiny", "--size", "64x64", "--steps", "1",
         "--device", "cpu", "--no-progress", "--out", str(tmp_path / "out"), "--lora", f"{path}:0.5"],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "unsuccessful" not in res.stderr  # diffusers' own log of the failure is not repeated
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error") or "Traceback" in ln]
    assert len(lines) == 1 and want in lines[0] and str(path) in lines[0], res.stderr
    assert "cfg" not in res.stderr and not list((tmp_path / "out").glob("*.png"))
