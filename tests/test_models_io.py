"""Presets (exact SDXL 1.0 sizes), diffusers-folder round trip with the model kind, load errors."""

from __future__ import annotations

import json

import pytest
import torch

from bigasp.errors import ModelLoadError
from bigasp.models import PRESETS, SDXL, ModelKind, build_preset, component_config
from bigasp.models.components import MODEL_KIND_FILE
from bigasp.models.io import load_model, save_diffusers_folder

# Published parameter counts of SDXL 1.0 base (UNet 2.567B, OpenCLIP bigG text tower with
# projection 694.7M, CLIP ViT-L text 123.1M, VAE 83.7M).
SDXL_PARAMS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_presets_are_shipped():
    assert {"tiny", "sdxl-base"} <= set(PRESETS)


def test_sdxl_base_parameter_counts_on_meta_device():
    m = build_preset("sdxl-base", device="meta")
    assert {c: n_params(mod) for c, mod in m.modules().items()} == SDXL_PARAMS
    assert all(p.is_meta for p in m.unet.parameters())


def test_sdxl_base_published_config_values():
    unet = component_config("sdxl-base", "unet")
    te1 = component_config("sdxl-base", "text_encoder")
    te2 = component_config("sdxl-base", "text_encoder_2")
    vae = component_config("sdxl-base", "vae")
    assert unet["cross_attention_dim"] == 2048 and unet["addition_time_embed_dim"] == 256
    assert unet["projection_class_embeddings_input_dim"] == 2816
    assert unet["transformer_layers_per_block"] == [1, 2, 10]
    assert (te1["hidden_size"], te1["num_hidden_layers"], te1["hidden_act"]) == (768, 12, "quick_gelu")
    assert (te2["hidden_size"], te2["num_hidden_layers"], te2["hidden_act"]) == (1280, 32, "gelu")
    assert te2["projection_dim"] == 1280
    assert vae["scaling_factor"] == 0.13025


@pytest.mark.parametrize("preset", ["tiny", "sdxl-base"])
def test_presets_are_internally_consistent(preset):
    """The UNet's cross-attention and ADM widths follow from the two text encoders."""
    unet = component_config(preset, "unet")
    te1 = component_config(preset, "text_encoder")
    te2 = component_config(preset, "text_encoder_2")
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert (
        unet["projection_class_embeddings_input_dim"]
        == 6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
    )
    assert te1["vocab_size"] == te2["vocab_size"] == 49408
    assert te1["max_position_embeddings"] == te2["max_position_embeddings"] == 77


def test_tiny_is_small_and_runs(tiny_model):
    total = sum(n_params(m) for m in tiny_model.modules().values())
    assert total < 8_000_000  # a few MB; mostly the two 49408-row token embeddings
    unet = tiny_model.unet
    d_ctx = unet.config.cross_attention_dim
    with torch.no_grad():
        out = unet(
            torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
            torch.tensor([10]),
            encoder_hidden_states=torch.zeros(1, 77, d_ctx),
            added_cond_kwargs={
                "text_embeds": torch.zeros(1, tiny_model.text_encoder_2.config.projection_dim),
                "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
            },
        ).sample
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_build_preset_is_deterministic_per_seed():
    a = build_preset("tiny", ["text_encoder"], seed=0).text_encoder.state_dict()
    b = build_preset("tiny", ["text_encoder"], seed=0).text_encoder.state_dict()
    c = build_preset("tiny", ["text_encoder"], seed=1).text_encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = next(k for k in a if k.endswith("encoder.layers.0.mlp.fc1.weight"))  # transformers 4: text_model.*
    assert not torch.equal(a[key], c[key])


def test_unknown_preset_and_component():
    with pytest.raises(ModelLoadError, match="unknown model preset 'sdxl-turbo'"):
        build_preset("sdxl-turbo")
    with pytest.raises(ModelLoadError, match="unknown component 'controlnet'"):
        component_config("tiny", "controlnet")


# --- diffusers folder ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_folder(tiny_model, tmp_path_factory):
    model = SDXL(**tiny_model.modules(), kind=ModelKind("flow", 3.0))
    return save_diffusers_folder(model, tmp_path_factory.mktemp("dfolder") / "model")


def test_diffusers_folder_round_trip_is_identical(tiny_model, saved_folder):
    loaded = load_model(saved_folder)
    for comp in SDXL.COMPONENTS:
        a, b = getattr(tiny_model, comp).state_dict(), getattr(loaded, comp).state_dict()
        assert a.keys() == b.keys(), comp
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), comp
    assert loaded.kind == ModelKind("flow", 3.0)
    assert loaded.source == str(saved_folder)


def test_diffusers_folder_records_the_model_kind(saved_folder):
    recorded = json.loads((saved_folder / MODEL_KIND_FILE).read_text())
    assert recorded == {"format_version": 1, "prediction": "flow", "shift": 3.0}
    index = json.loads((saved_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert all(p.suffix != ".bin" for p in saved_folder.rglob("*"))  # safetensors only
    assert (saved_folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_diffusers_folder_partial_load_and_kind_override(saved_folder):
    m = load_model(saved_folder, ["text_encoder"], kind=ModelKind("eps"))
    assert m.unet is None and m.vae is None and m.text_encoder is not None
    assert m.kind == ModelKind("eps")


def test_folder_without_kind_file_is_eps(tiny_model, tmp_path):
    path = save_diffusers_folder(SDXL(text_encoder=tiny_model.text_encoder), tmp_path / "m")
    (path / MODEL_KIND_FILE).unlink()
    assert load_model(path, ["text_encoder"]).kind == ModelKind("eps", 1.0)
    with pytest.raises(ModelLoadError, match="has no unet/ subfolder"):
        load_model(path, ["unet"])


def test_saved_folder_opens_in_diffusers_pipeline(saved_folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(saved_folder), local_files_only=True)
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token_id == 49407


# --- errors ---------------------------------------------------------------------------------


def test_hub_id_is_refused_with_instructions():
    with pytest.raises(ModelLoadError) as err:
        load_model("stabilityai/stable-diffusion-xl-base-1.0")
    msg = str(err.value)
    assert "hub id" in msg and "never downloads" in msg
    assert "local path" in msg and "huggingface-cli download" in msg


def test_missing_path_names_the_path_and_the_options(tmp_path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(ModelLoadError) as err:
        load_model(missing)
    msg = str(err.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "diffusers folder" in msg and "single-file" in msg and "tiny" in msg


def test_pickle_checkpoints_are_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match=r"not a \.safetensors file.*never pickle"):
        load_model(ckpt)


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers model"):
        load_model(tmp_path)


def test_model_kind_validation():
    with pytest.raises(ModelLoadError, match="'eps' or 'flow'"):
        ModelKind("v")
    with pytest.raises(ModelLoadError, match="shift must be > 0"):
        ModelKind("flow", 0.0)
    with pytest.raises(ModelLoadError, match="no 'prediction' field"):
        ModelKind.from_json({"shift": 2.0}, "x.json")
    assert ModelKind.from_json(ModelKind("flow", 2.5).to_json()) == ModelKind("flow", 2.5)


def test_hub_layout_text_encoders_load_in_fp32(tiny_model, tmp_path):
    """A folder as published on the hub: fp16 weights, `torch_dtype: float16` in the config and
    `text_model.` key prefixes (older transformers). bigasp loads it as fp32, values intact."""
    from safetensors.torch import save_file

    for comp in ("text_encoder", "text_encoder_2"):
        sub = tmp_path / comp
        sub.mkdir()
        cfg = component_config("tiny", comp)
        assert cfg["torch_dtype"] == "float16"
        (sub / "config.json").write_text(json.dumps(cfg))
        sd = getattr(tiny_model, comp).state_dict()
        renamed = {
            k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in sd.items()
        }
        save_file({k: v.half().contiguous() for k, v in renamed.items()}, str(sub / "model.safetensors"))
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    loaded = load_model(tmp_path, ["text_encoder", "text_encoder_2"])
    for comp in ("text_encoder", "text_encoder_2"):
        got = getattr(loaded, comp).state_dict()
        for k, v in getattr(tiny_model, comp).state_dict().items():
            assert got[k].dtype == torch.float32 and torch.equal(got[k], v.half().float()), (comp, k)


def test_a_half_precision_run_from_a_single_file_keeps_its_tensors_and_its_image(tmp_path):
    """`generate --dtype bf16` from an fp16 single file loads the tensors as stored (no fp32 copy)
    and makes the same PNG as the same weights from a diffusers folder (which load as fp32)."""
    import numpy as np
    from PIL import Image

    from bigasp.cli import main
    from bigasp.models.single_file import save_single_file

    path = save_single_file(build_preset("tiny"), tmp_path / "m.safetensors", dtype=torch.float16)
    kept = load_model(path, file_dtype_kept=True)
    assert {p.dtype for m in kept.modules().values() for p in m.parameters()} == {torch.float16}
    save_diffusers_folder(load_model(path), tmp_path / "folder")
    pixels = []
    for source in (path, tmp_path / "folder"):
        out = tmp_path / f"out-{source.name}"
        args = ["generate", "a cat", "--model", str(source), "--size", "64x64", "--steps", "2"]
        main([*args, "--device", "cpu", "--dtype", "bf16", "--out", str(out)])
        (png,) = out.glob("*.png")
        pixels.append(np.asarray(Image.open(png)))
    assert np.array_equal(*pixels)
