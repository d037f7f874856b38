"""LoRA at inference: kohya and diffusers files load through diffusers/peft, several at once, and
merge exactly as W + weight * (alpha / rank) * up @ down."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from bigasp.errors import ConfigError
from bigasp.models import build_preset
from bigasp.models.single_file import unet_key_to_ldm
from bigasp.sample.lora import LoraSpec, apply_loras, parse_lora

pytest.importorskip("peft")

UNET_MOD = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
MID_MOD = "mid_block.attentions.0.transformer_blocks.1.attn2.to_v"
TE_LAYER = "text_model.encoder.layers.0.self_attn"
TE_PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")
RANK = 2


def _factors(module: torch.nn.Linear, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(RANK, module.in_features, generator=g) * 0.1
    up = torch.randn(module.out_features, RANK, generator=g) * 0.1
    return down, up


def _kohya_name(model, diffusers_module: str) -> str:
    ldm = unet_key_to_ldm(
        f"{diffusers_module}.weight",
        layers_per_block=model.unet.config.layers_per_block,
        up_blocks_with_attention=set(),
    )
    return "lora_unet_" + ldm.removesuffix(".weight").replace(".", "_")


def _te(model, name: str):
    return model.text_encoder.get_submodule(name if hasattr(model.text_encoder, "text_model") else name[11:])


def write_kohya(path, model, seed: int, alpha: float) -> dict[str, torch.Tensor]:
    """kohya sd-scripts' SDXL layout: SGM block names, lora_down/lora_up/alpha; returns the deltas."""
    tensors, deltas = {}, {}
    for mod in (UNET_MOD, MID_MOD):
        down, up = _factors(model.unet.get_submodule(mod), seed)
        key = _kohya_name(model, mod)
        tensors |= {
            f"{key}.lora_down.weight": down,
            f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(alpha),
        }
        deltas[f"unet.{mod}"] = (alpha / RANK) * up @ down
    for k, proj in enumerate(TE_PROJ):  # kohya trains all four attention projections of a layer
        mod = f"{TE_LAYER}.{proj}"
        down, up = _factors(_te(model, mod), seed + 1 + k)
        key = "lora_te1_" + mod.replace(".", "_")
        tensors |= {
            f"{key}.lora_down.weight": down,
            f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(alpha),
        }
        deltas[f"te1.{mod}"] = (alpha / RANK) * up @ down
    save_file(tensors, str(path))
    return deltas


def write_diffusers(path, model, seed: int) -> dict[str, torch.Tensor]:
    """diffusers/peft layout (what `save_lora_weights` writes): lora_A/lora_B, scale 1."""
    down, up = _factors(model.unet.get_submodule(UNET_MOD), seed)
    save_file({f"unet.{UNET_MOD}.lora_A.weight": down, f"unet.{UNET_MOD}.lora_B.weight": up}, str(path))
    return {f"unet.{UNET_MOD}": up @ down}


def _weight(model, where: str) -> torch.Tensor:
    part, mod = where.split(".", 1)
    return (model.unet.get_submodule(mod) if part == "unet" else _te(model, mod)).weight.detach().clone()


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
        target = manual.unet.get_submodule(mod) if part == "unet" else _te(manual, mod)
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
