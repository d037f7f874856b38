"""Adapters (LoRA, LoCon, LoKr, LoHa) as the trainer's choice of what trains, through peft.

With `[model] adapter` set, the loaded model is the frozen *base*: every base weight stops
training, and peft injects adapter layers into the chosen linears/convs of the UNet and of the
text encoders that `train_text_encoder(_2)` name. The modules keep their names and classes
around the adapter (peft wraps `to_q` as a `LoraLayer` whose `base_layer` is the old Linear), so
the Denoiser, the objectives, validation, EMA, DDP and gradient checkpointing run unchanged; only
the trainable parameters differ. peft is used for all four algorithms because it implements
LoKr and LoHa after LyCORIS (its layers cite LyCORIS' code) without the `lycoris-lora` package.

A checkpoint holds the adapter only: `model/<component>/adapter.safetensors` (the exact fp32
trainable tensors under peft's names, what a resume reads), `model/adapter.json` (the settings
and the base's identity) and the files people use, written by `bigasp.models.adapter_files`.
A resume checks the base it is given against the recorded identity and refuses another one.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from bigasp.errors import BigaspError, ConfigError

if TYPE_CHECKING:
    from bigasp.models.components import SDXL
    from bigasp.train.config import RunConfig

ADAPTER_NAME = "default"  # peft's adapter name inside the layers
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_JSON = "adapter.json"
FORMAT_VERSION = 1
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# Target presets by module path (diffusers UNet2DConditionModel / transformers CLIP names).
# attention_ff is kohya's LoRA set (every Linear inside a Transformer2DModel); all adds kohya's
# LoCon set (every Linear/Conv2d inside ResnetBlock2D, Downsample2D, Upsample2D).
_UNET_ATTENTION = re.compile(r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)")
_UNET_FF = re.compile(
    r".*\.attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2))"
)
_UNET_CONV = re.compile(
    r".*(\.resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|\.(down|up)samplers\.0\.conv)"
)
# Text encoders: the six per-layer weights ComfyUI's LoRA loader maps (q/k/v/out_proj, fc1, fc2).
_TE_ATTENTION = re.compile(r"(.*\.)?layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)")
_TE_FF = re.compile(r"(.*\.)?layers\.(\d+)\.mlp\.(fc1|fc2)")


def adapted(cfg: RunConfig, component: str) -> bool:
    """Whether `component` gets an adapter (the UNet always; encoders as train_text_encoder(_2) say)."""
    m = cfg.model
    return {"unet": True, "text_encoder": m.train_text_encoder, "text_encoder_2": m.train_text_encoder_2}[
        component
    ]


def targets_preset(cfg: RunConfig) -> str:
    m = cfg.model
    return m.adapter_targets or ("all" if m.adapter == "locon" else "attention_ff")


def alpha_of(cfg: RunConfig) -> float:
    m = cfg.model
    return float(m.adapter_alpha if m.adapter_alpha is not None else m.adapter_rank)


def check_adapter_config(cfg: RunConfig) -> None:
    """One-line errors for adapter settings that cannot work (run at config validation, before any
    model loads). Raises ValueError, which the config loader reports with the file's name."""
    m, t = cfg.model, cfg.train
    fields = type(m).model_fields
    set_keys = [k for k in fields if k.startswith("adapter_") and getattr(m, k) != fields[k].default]
    if m.adapter is None:
        if set_keys:
            raise ValueError(
                f"model.{sorted(set_keys)[0]} is set but model.adapter is unset; set model.adapter = 'lora' "
                "(or locon, lokr, loha) or remove the adapter_* keys for a full finetune"
            )
        return
    preset = targets_preset(cfg)
    if m.adapter == "locon" and preset != "all":
        raise ValueError(
            f"model.adapter_targets = '{preset}' contradicts model.adapter = 'locon' (LoCon is LoRA on the "
            "convs too); use adapter = 'lora' for these targets, or adapter_targets = 'all'"
        )
    if m.adapter == "lora" and preset == "all":
        raise ValueError(
            "model.adapter_targets = 'all' with model.adapter = 'lora' is LoCon: set model.adapter = 'locon'"
        )
    for key in ("text_encoder_layers", "text_encoder_2_layers"):
        if getattr(m, key) is not None:
            raise ValueError(
                f"model.{key} cannot combine with model.adapter (adapters go on every layer of an adapted "
                "encoder); remove it"
            )
    if t.parallelism == "fsdp2":
        raise ValueError(
            "train.parallelism = 'fsdp2' cannot combine with model.adapter (the adapter is small: every rank "
            "holds it); use parallelism = 'ddp'"
        )
    if m.frozen_dtype != "fp32" and t.precision == "fp32":
        raise ValueError(
            f"model.frozen_dtype = '{m.frozen_dtype}' with model.adapter stores the frozen base in "
            f"{m.frozen_dtype}, which needs autocast: set train.precision = 'bf16' (or 'fp16'), or "
            "frozen_dtype = 'fp32'"
        )


def target_modules(component: str, module: torch.nn.Module, preset: str) -> list[str]:
    """Full module paths (in `module`) of the Linear/Conv2d layers the preset adapts.

    TE1's last transformer layer is left out: SDXL conditions on TE1's penultimate hidden state,
    so an adapter there would never receive a gradient."""
    found = []
    layers = [n for n, _ in module.named_modules() if re.fullmatch(r"(.*\.)?encoder\.layers\.\d+", n)]
    last_te1 = len(layers) - 1 if component == "text_encoder" else None
    for name, sub in module.named_modules():
        if not isinstance(sub, torch.nn.Linear | torch.nn.Conv2d):
            continue
        if component == "unet":
            hit = bool(_UNET_ATTENTION.fullmatch(name)) or (
                preset != "attention" and bool(_UNET_FF.fullmatch(name))
            ) or (preset == "all" and bool(_UNET_CONV.fullmatch(name)))  # fmt: skip
        else:
            m = _TE_ATTENTION.fullmatch(name) or (preset != "attention" and _TE_FF.fullmatch(name))
            hit = bool(m) and int(m[2]) != last_te1  # type: ignore[index]
        if hit:
            found.append(name)
    return found


def peft_config(cfg: RunConfig, targets: list[str]):
    """The peft config of the algorithm; targets are exact module paths."""
    import peft

    m = cfg.model
    common = {"r": m.adapter_rank, "target_modules": targets}
    if m.adapter in ("lora", "locon"):
        return peft.LoraConfig(lora_alpha=alpha_of(cfg), lora_dropout=m.adapter_dropout, **common)
    cls = peft.LoKrConfig if m.adapter == "lokr" else peft.LoHaConfig
    return cls(alpha=alpha_of(cfg), rank_dropout=m.adapter_dropout, **common)


def apply_adapters(cfg: RunConfig, model: SDXL) -> list[torch.nn.Parameter]:
    """Freeze every base weight of `model` and inject the configured adapter; return the trainable
    parameters (the adapter's, fp32). The adapter's random init is keyed by model.init_seed (the
    global RNG is left as it was). This is the build path the trainer and the memory bench share."""
    from peft import inject_adapter_in_model

    preset = targets_preset(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.model.init_seed)
        for comp in COMPONENTS:
            module = getattr(model, comp)
            if module is None:
                continue
            module.requires_grad_(False)
            if not adapted(cfg, comp):
                continue
            targets = target_modules(comp, module, preset)
            if not targets:
                raise ConfigError(
                    f"model.adapter_targets = '{preset}' matches no layer of the {comp}; pick another preset"
                )
            inject_adapter_in_model(peft_config(cfg, targets), module, adapter_name=ADAPTER_NAME)
    return [p for c in COMPONENTS if getattr(model, c) is not None for p in getattr(model, c).parameters()
            if p.requires_grad]  # fmt: skip


def configure_adapted_model(model: SDXL, cfg: RunConfig, device: torch.device) -> None:
    """The adapter counterpart of the trainer's `configure_model`: frozen base in `frozen_dtype`
    (no copy of originals: adapter checkpoints never write the base), adapters injected, train
    mode on the adapted parts, gradient checkpointing, everything on `device`."""
    from bigasp.train.trainer import DTYPES

    storage = DTYPES[cfg.model.frozen_dtype]
    for comp in COMPONENTS:
        module = getattr(model, comp)
        module.requires_grad_(False).to(storage).train(adapted(cfg, comp))
    apply_adapters(cfg, model)
    if cfg.model.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for comp in ("text_encoder", "text_encoder_2"):
            if adapted(cfg, comp):  # non-reentrant: the frozen embeddings' output needs no grad
                getattr(model, comp).gradient_checkpointing_enable({"use_reentrant": False})
    for comp in COMPONENTS:
        getattr(model, comp).to(device)
    if model.vae is not None:
        model.vae.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------
# the base's identity


def base_identity(model: SDXL) -> str:
    """`base-<16 hex>` over every weight's name, shape and fp32 value of the UNet and the text
    encoders, in name order: the same base from a folder or a single file has one identity, any
    changed weight another. Computed before the adapter is injected (the names are the base's)."""
    h = hashlib.sha256()
    for comp in COMPONENTS:
        module = getattr(model, comp)
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{comp}.{name}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return "base-" + h.hexdigest()[:16]


def settings(cfg: RunConfig) -> dict[str, Any]:
    """What an adapter checkpoint must agree with to be resumed."""
    m = cfg.model
    return {
        "algorithm": m.adapter,
        "rank": m.adapter_rank,
        "alpha": alpha_of(cfg),
        "targets": targets_preset(cfg),
        "components": [c for c in COMPONENTS if adapted(cfg, c)],
    }


_SETTING_KEYS = {
    "algorithm": "model.adapter",
    "rank": "model.adapter_rank",
    "alpha": "model.adapter_alpha",
    "targets": "model.adapter_targets",
    "components": "model.train_text_encoder / train_text_encoder_2",
}


# ---------------------------------------------------------------------------------------------
# checkpoint folder


def trainable_state(model: SDXL) -> dict[str, dict[str, torch.Tensor]]:
    """component -> {peft parameter name: CPU copy} of the adapter's weights."""
    return {
        comp: {
            n: p.detach().to("cpu", copy=True)
            for n, p in getattr(model, comp).named_parameters()
            if p.requires_grad
        }
        for comp in COMPONENTS
        if getattr(model, comp) is not None
        and any(p.requires_grad for p in getattr(model, comp).parameters())
    }


def split_flat(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{'unet.x': t} (the EMA's naming) -> {'unet': {'x': t}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in flat.items():
        comp, rest = name.split(".", 1)
        out.setdefault(comp, {})[rest] = t.detach().to("cpu", torch.float32, copy=True)
    return out


def write_folder(
    folder: Path, model: SDXL, cfg: RunConfig, identity: str, state: dict[str, dict[str, torch.Tensor]]
) -> None:
    """An adapter checkpoint's model/ (or ema/) folder: the exact state per component, the settings
    and base identity, and the kohya/LyCORIS and diffusers files for other tools."""
    from bigasp.models import adapter_files

    folder.mkdir(parents=True, exist_ok=True)
    for comp, tensors in state.items():
        (folder / comp).mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / comp / ADAPTER_FILE))
    meta = {
        "format_version": FORMAT_VERSION,
        **settings(cfg),
        "base": {"identity": identity, "source": cfg.model.source},
        "prediction": cfg.model_kind().prediction,
        "files": adapter_files.write_files(
            folder, model, state, algorithm=cfg.model.adapter, alpha=alpha_of(cfg)
        ),
    }
    (folder / ADAPTER_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(folder: Path) -> dict[str, Any] | None:
    path = folder / ADAPTER_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise BigaspError(f"{path} is not valid JSON ({err}); the checkpoint is damaged") from None


def check_resume(ckpt: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """Refuse, in one line naming the setting, a resume whose checkpoint and config disagree on
    the adapter (run before any model loads). Returns the checkpoint's adapter metadata (None: a
    full-finetune checkpoint)."""
    meta = read_meta(ckpt / "model")
    if cfg.model.adapter is None:
        if meta is not None:
            raise BigaspError(
                f"{ckpt} holds a {meta.get('algorithm')} adapter, not a model: set model.adapter = "
                f"'{meta.get('algorithm')}' (and model.source to its base) to resume it"
            )
        return None
    if meta is None:
        raise BigaspError(
            f"{ckpt} is a full-finetune checkpoint but model.adapter = '{cfg.model.adapter}'; unset model.adapter "
            f"to resume it, or start a new adapter run with model.source = {ckpt / 'model'}"
        )
    want = settings(cfg)
    for key, key_name in _SETTING_KEYS.items():
        if meta.get(key) != want[key]:
            raise BigaspError(
                f"{key_name} gives {want[key]!r} but {ckpt} trained {meta.get(key)!r}; keep it as it was to "
                "resume, or start a new run"
            )
    return meta


def check_base(ckpt: Path, cfg: RunConfig, identity: str) -> None:
    """Refuse an adapter checkpoint resumed on another base than the one it trained on."""
    base = (read_meta(ckpt / "model") or {}).get("base", {})
    if base.get("identity") != identity:
        raise BigaspError(
            f"model.source = {cfg.model.source} is not the base {ckpt} was trained on (its weights are "
            f"{identity}, the adapter's base {base.get('identity')} from {base.get('source')}); set model.source "
            "to that base to resume"
        )


def load_state(model: SDXL, folder: Path) -> None:
    """Copy the saved adapter weights (folder/<component>/adapter.safetensors) into the live layers."""
    for comp in COMPONENTS:
        module = getattr(model, comp)
        want = {n: p for n, p in module.named_parameters() if p.requires_grad} if module is not None else {}
        if not want:
            continue
        path = folder / comp / ADAPTER_FILE
        try:
            saved = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise BigaspError(f"{path}: cannot be read ({err}); the checkpoint is damaged") from None
        missing = sorted(set(want) - set(saved))
        if missing or len(saved) != len(want):
            raise BigaspError(
                f"{path} does not match the adapter this config builds ({len(saved)} tensors saved, {len(want)} "
                f"expected; first missing: {missing[:1]}); the checkpoint is damaged or from other settings"
            )
        with torch.no_grad():
            for name, p in want.items():
                if saved[name].shape != p.shape:
                    raise BigaspError(
                        f"{path}: {name} has shape {tuple(saved[name].shape)}, expected {tuple(p.shape)}"
                    )
                p.copy_(saved[name])
