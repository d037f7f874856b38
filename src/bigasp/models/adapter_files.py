"""Adapter files other tools read: the kohya/LyCORIS layout and diffusers' layout, and the merge of
LyCORIS (LoKr/LoHa) files at inference.

kohya layout (what ComfyUI's LoraLoader, A1111/Forge and kohya sd-scripts read), one tensor
group per adapted layer, named `<prefix>_<module path with '.' -> '_'>`:

- prefixes `lora_unet` (the UNet, under its SGM single-file names, e.g. `input_blocks_4_1_...`),
  `lora_te1` (CLIP ViT-L) and `lora_te2` (OpenCLIP bigG), both under Hugging Face names with
  `text_model.`;
- LoRA / LoCon: `.lora_down.weight` (rank x in[, k, k]), `.lora_up.weight` (out x rank[, 1, 1])
  and `.alpha`: delta = alpha / rank * up @ down;
- LoHa: `.hada_w1_a/.hada_w1_b/.hada_w2_a/.hada_w2_b` and `.alpha`:
  delta = alpha / rank * (w1_a @ w1_b) * (w2_a @ w2_b), rank = w1_b's rows;
- LoKr: `.lokr_w1` or `.lokr_w1_a/_b`, `.lokr_w2` or `.lokr_w2_a/_b`, and `.alpha`:
  delta = scale * kron(w1, w2), scale = alpha / rank when a factor is decomposed, else 1.

(The key names and formulas are those tests/test_train_adapters.py records from ComfyUI's loader
and kohya's networks code.) peft scales LoKr by alpha / rank also when nothing is decomposed, so
that case is written with the scale folded into `lokr_w1`.

diffusers layout (LoRA/LoCon only; diffusers has no LoKr/LoHa format): `unet.<module>.lora_A.weight`,
`.lora_B.weight`, `text_encoder.*`, `text_encoder_2.*`, scale folded into `lora_B` (no alpha).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bigasp.errors import ConfigError, ModelLoadError
from bigasp.models.single_file import unet_key_to_ldm

KOHYA_FILE = "lora.safetensors"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(folder) looks for
PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
_PEFT = re.compile(
    r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|lokr_t2|"
    r"hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b|hada_t1|hada_t2)\.default(\.weight)?"
)
LYCORIS_SUFFIXES = (
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
)  # fmt: skip


def _te_path(module: str) -> str:
    """Encoder module paths always with `text_model.` (transformers 5 drops it from CLIPTextModel)."""
    return module if module.startswith("text_model.") else f"text_model.{module}"


def _unet_names(unet: torch.nn.Module):
    lpb = unet.config.layers_per_block
    with_attn = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    return lambda module: unet_key_to_ldm(
        f"{module}.weight", layers_per_block=lpb, up_blocks_with_attention=with_attn
    ).removesuffix(".weight")


def kohya_name(component: str, module: str, unet: torch.nn.Module | None = None) -> str:
    """`lora_unet_input_blocks_4_1_..._to_q` / `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`."""
    path = _unet_names(unet)(module) if component == "unet" else _te_path(module)
    return f"{PREFIX[component]}_{path.replace('.', '_')}"


def group_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """peft parameter names -> {module path: {'lora_A': t, ...}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        m = _PEFT.fullmatch(name)
        if m is None:
            raise ValueError(f"adapter tensor {name!r} is not a peft LoRA/LoKr/LoHa parameter")
        out.setdefault(m["module"], {})[m["kind"]] = t.detach().to("cpu", torch.float32)
    return out


def _rank(parts: dict[str, torch.Tensor]) -> int:
    for kind in ("lora_A", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if kind in parts:
            return parts[kind].shape[0]
    return 0  # LoKr with both factors full: no rank in the tensors


def kohya_tensors(
    model, state: dict[str, dict[str, torch.Tensor]], *, algorithm: str, alpha: float
) -> dict[str, torch.Tensor]:
    """The adapter `state` (component -> peft names) in the kohya/LyCORIS layout."""
    out: dict[str, torch.Tensor] = {}
    for comp, tensors in state.items():
        for module, parts in group_state(tensors).items():
            key = kohya_name(comp, module, model.unet)
            if algorithm in ("lora", "locon"):
                out[f"{key}.lora_down.weight"] = parts["lora_A"]
                out[f"{key}.lora_up.weight"] = parts["lora_B"]
            elif algorithm == "loha":
                out |= {f"{key}.{k}": v for k, v in parts.items()}
            else:  # lokr
                parts = dict(parts)
                # ComfyUI applies no alpha when no factor is decomposed: fold peft's scale into w1
                if _rank(parts) == 0 and "lokr_w1" in parts:
                    r = _lokr_rank(model, comp, module)
                    parts["lokr_w1"] = parts["lokr_w1"] * (alpha / r)
                out |= {f"{key}.{k}": v for k, v in parts.items()}
            out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return {k: v.contiguous() for k, v in out.items()}


def _lokr_rank(model, comp: str, module: str) -> int:
    layer = getattr(model, comp).get_submodule(module)
    return int(layer.r["default"])


def diffusers_tensors(state: dict[str, dict[str, torch.Tensor]], *, alpha: float) -> dict[str, torch.Tensor]:
    """A LoRA `state` in diffusers' layout (what `save_lora_weights` writes; scale folded into lora_B)."""
    out: dict[str, torch.Tensor] = {}
    for comp, tensors in state.items():
        for module, parts in group_state(tensors).items():
            path = module if comp == "unet" else _te_path(module)
            scale = alpha / parts["lora_A"].shape[0]
            out[f"{comp}.{path}.lora_A.weight"] = parts["lora_A"].contiguous()
            out[f"{comp}.{path}.lora_B.weight"] = (parts["lora_B"] * scale).contiguous()
    return out


def write_files(
    folder: Path, model, state: dict[str, dict[str, torch.Tensor]], *, algorithm: str, alpha: float
) -> list[str]:
    """Write the files people use into `folder`; returns their names."""
    meta = {"ss_network_module": "networks.lora" if algorithm in ("lora", "locon") else "lycoris.kohya",
            "ss_network_alpha": f"{alpha:g}", "ss_base_model_version": "sdxl_base_v1-0",
            "bigasp_adapter": algorithm}  # fmt: skip
    save_file(kohya_tensors(model, state, algorithm=algorithm, alpha=alpha), str(folder / KOHYA_FILE), meta)
    names = [KOHYA_FILE]
    if algorithm in ("lora", "locon"):
        save_file(diffusers_tensors(state, alpha=alpha), str(folder / DIFFUSERS_FILE))
        names.append(DIFFUSERS_FILE)
    return names


# ---------------------------------------------------------------------------------------------
# LyCORIS files at inference


def is_lycoris(path: str | Path) -> bool:
    """Whether a .safetensors file holds LoKr/LoHa tensors (which diffusers' loader does not read)."""
    with safe_open(str(path), "pt") as f:
        return any(k.rsplit(".", 1)[-1] in LYCORIS_SUFFIXES for k in f.keys())  # noqa: SIM118 (safe_open is no dict)


def kohya_module_map(model) -> dict[str, tuple[str, torch.nn.Module]]:
    """kohya name -> (component, Linear/Conv2d) for every weight layer of the UNet and encoders."""
    out: dict[str, tuple[str, torch.nn.Module]] = {}
    for comp in PREFIX:
        root = getattr(model, comp)
        if root is None:
            continue
        for name, mod in root.named_modules():
            if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d):
                try:
                    out[kohya_name(comp, name, model.unet)] = (comp, mod)
                except ModelLoadError:  # a layer with no SGM name (none in SDXL) cannot be targeted
                    continue
    return out


def lycoris_delta(parts: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """One layer's weight delta from its LoHa/LoKr tensors, as the kohya layout defines it."""
    p = {k: v.to(torch.float32) for k, v in parts.items()}
    alpha = float(p["alpha"]) if "alpha" in p else None
    if "hada_w1_a" in p:
        if "hada_t1" in p:
            raise ValueError("LoHa with Tucker factors (hada_t1/hada_t2) is not supported")
        rank = p["hada_w1_b"].shape[0]
        diff = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        return diff.reshape(shape) * (alpha / rank if alpha is not None else 1.0)
    if "lokr_t2" in p:
        raise ValueError("LoKr with a Tucker factor (lokr_t2) is not supported")
    rank = None
    w1 = p.get("lokr_w1")
    if w1 is None:
        w1, rank = p["lokr_w1_a"] @ p["lokr_w1_b"], p["lokr_w1_b"].shape[0]
    w2 = p.get("lokr_w2")
    if w2 is None:
        w2, rank = p["lokr_w2_a"] @ p["lokr_w2_b"], p["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


def merge_lycoris(model, path: str | Path, weight: float, what: str, clip_weight: float | None = None) -> int:
    """Add `weight` x each UNet layer's delta of a LoKr/LoHa file into `model` (`clip_weight`, by
    default the same, for the text encoders' layers, as ComfyUI's strength_model/strength_clip);
    returns the layers merged.

    A file whose names or shapes do not fit this model (another architecture) is refused in one
    line before any weight changes."""
    from safetensors.torch import load_file

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path)).items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix.removesuffix(".weight")] = t
    layers = kohya_module_map(model)
    unknown = sorted(n for n in groups if n not in layers)
    if unknown:
        raise ConfigError(
            f"{what}: {len(unknown)} of its {len(groups)} layers match no layer of this SDXL model (first: "
            f"{unknown[0]}); it is for another architecture"
        )
    deltas: list[tuple[torch.nn.Module, float, torch.Tensor]] = []
    for name, parts in groups.items():
        comp, mod = layers[name]
        strength = weight if comp == "unet" or clip_weight is None else clip_weight
        try:
            deltas.append((mod, strength, lycoris_delta(parts, mod.weight.shape)))
        except (RuntimeError, KeyError, ValueError) as err:
            raise ConfigError(
                f"{what}: layer {name} does not fit this model ({type(err).__name__}: {err}); it is for "
                "another architecture or rank layout"
            ) from None
    with torch.no_grad():
        for mod, strength, delta in deltas:
            mod.weight += (strength * delta).to(mod.weight.dtype)
    return len(deltas)
