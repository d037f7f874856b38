"""Tiny SDXL LoRA files in kohya's and diffusers' layouts, written for a given tiny model, with the
weight deltas they should merge to (W += weight * (alpha / rank) * up @ down)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from bigasp.models.single_file import unet_key_to_ldm

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


def te_module(model, name: str):
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
        down, up = _factors(te_module(model, mod), seed + 1 + k)
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
