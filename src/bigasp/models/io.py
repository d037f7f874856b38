"""Load SDXL from local disk, save a diffusers folder. Never touches the network.

Accepted sources (`load_model`):
- a preset name (`tiny`, `sdxl-base`): random weights from shipped configs;
- a local diffusers folder (`model_index.json`, or `unet/`, `vae/`, ... subfolders);
- a local single-file SDXL `.safetensors` in original LDM key layout (Civitai/ComfyUI files,
  e.g. the bigASP releases), see `bigasp.models.single_file`.
A hub id or a missing path is an error that says weights must be local.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from bigasp import progress
from bigasp.errors import ModelLoadError
from bigasp.fsutil import usual_mode
from bigasp.models.components import SDXL, ModelKind
from bigasp.models.presets import PRESETS, build_preset, component_config

DIFFUSERS_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "tokenizer_2": ("transformers", "CLIPTokenizer"),
    "scheduler": ("diffusers", "EulerDiscreteScheduler"),
}


_CKPT_NAME = re.compile(r"^(\.tmp-)?step-\d{12}")


def incomplete_checkpoint(path: Path) -> str | None:
    """If `path` is (inside) a training checkpoint that is not complete, say so and what to use.

    A missing `model/` there is an interrupted save or deleted files, not a model to download."""
    for ckpt in (path, *list(path.parents)[:2]):
        if not _CKPT_NAME.match(ckpt.name) or not ckpt.parent.is_dir():
            continue
        try:
            complete = bool(json.loads((ckpt / "checkpoint.json").read_text()).get("complete"))
        except (OSError, ValueError):
            complete = False
        done = sorted(
            p.name for p in ckpt.parent.iterdir() if _CKPT_NAME.match(p.name) and not p.name.startswith(".")
            and (p / "checkpoint.json").is_file() and p != ckpt and (p / "model").is_dir()
        )  # fmt: skip
        other = f"; use another checkpoint, e.g. {ckpt.parent / done[-1] / 'model'}" if done else ""
        state = (
            "complete but its files are partly missing"
            if complete
            else "incomplete (its save was interrupted)"
        )
        return f"{ckpt} is a training checkpoint that is {state}; it holds no loadable model{other}"
    return None


def adapter_checkpoint(path: Path) -> str | None:
    """If `path` is an adapter run's checkpoint (or its model/ or ema/ folder), say how to use it.

    Such a checkpoint holds only the adapter (LoRA, LoKr, ...) and the base's identity, so it is
    not a model to load or export on its own: it goes on top of its base."""
    for folder in (path, path / "model"):
        meta_path = folder / "adapter.json"
        if not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as err:
            return f"{meta_path} is not valid JSON ({err}); the adapter checkpoint is damaged"
        files = [folder / f for f in meta.get("files", [])]
        use = files[0] if files else folder / "lora.safetensors"
        base = (meta.get("base") or {}).get("source") or "its base model"
        return (
            f"{path} is a {meta.get('algorithm', 'adapter')} checkpoint (rank {meta.get('rank', '?')}), not a "
            f"whole model: use it on top of its base, e.g. `bigasp generate --model {base} --lora {use}`, "
            f"or load {use.name} with ComfyUI's LoraLoader"
        )
    return None


def describe_missing(spec: str) -> str:
    hint = incomplete_checkpoint(Path(spec).expanduser())
    if hint is not None:
        return hint
    looks_like_hub = "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1
    hint = (
        f"{spec!r} looks like a Hugging Face hub id, but bigasp never downloads weights. "
        if looks_like_hub
        else f"{spec!r} does not exist. "
    )
    return (
        hint + "Pass a local path: a diffusers folder (with model_index.json or unet/), a single-file "
        "SDXL .safetensors (e.g. bigasp_v20.safetensors), or a preset name "
        f"({', '.join(PRESETS)}). To fetch hub weights, download them yourself first "
        "(e.g. `huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0 --local-dir sdxl`)."
    )


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


def load_model(
    spec: str | os.PathLike,
    components: Iterable[str] = SDXL.COMPONENTS,
    *,
    kind: ModelKind | None = None,
    preset: str | None = None,
    seed: int = 0,
    file_dtype_kept: bool = False,
) -> SDXL:
    """Load the requested components from a preset name, a diffusers folder or a single file.

    `kind` overrides the model kind recorded in the checkpoint (or assumed: eps).
    `preset` names the architecture of a single file when it cannot be inferred.
    `file_dtype_kept`: a single file's tensors keep their stored dtype (e.g. fp16, for a run in
    fp16: no fp32 copy is ever made) instead of being loaded as fp32.
    """
    components = tuple(components)
    spec_str = str(spec)
    progress.quiet_libraries()
    if spec_str in PRESETS:
        return build_preset(spec_str, components, seed=seed, kind=kind)
    path = Path(spec_str).expanduser()
    if path.is_dir() and (hint := adapter_checkpoint(path)) is not None:
        raise ModelLoadError(hint)
    if is_diffusers_folder(path):
        return load_diffusers_folder(path, components, kind=kind)
    if path.is_file() and path.suffix in (".safetensors", ".sft"):
        from bigasp.models.single_file import load_single_file

        as_stored = {"dtype": None} if file_dtype_kept else {}  # default: fp32 modules
        return load_single_file(path, components, kind=kind, preset=preset, **as_stored)
    if path.is_dir() and incomplete_checkpoint(path) is not None:
        raise ModelLoadError(incomplete_checkpoint(path))  # type: ignore[arg-type]
    if path.is_dir():
        raise ModelLoadError(
            f"{path} is a folder but not a diffusers model (no model_index.json or unet/). "
            "Point at the folder that holds unet/, vae/, text_encoder/ and text_encoder_2/."
        )
    if path.is_file():
        raise ModelLoadError(
            f"{path} is not a .safetensors file; bigasp reads only safetensors (never pickle .ckpt/.pt). "
            "Convert it with a trusted tool first."
        )
    raise ModelLoadError(describe_missing(spec_str))


def load_diffusers_folder(path: Path, components: Iterable[str], *, kind: ModelKind | None = None) -> SDXL:
    model = SDXL(kind=kind or ModelKind.load(path) or ModelKind(), source=str(path))
    for comp in progress.bar(components, desc=f"loading {path.name}", unit="part"):
        sub = path / comp
        if not sub.is_dir():
            hint = incomplete_checkpoint(path)
            raise ModelLoadError(hint or f"{path} has no {comp}/ subfolder; it is needed here")
        try:
            if comp in ("unet", "vae"):
                import diffusers

                cls = getattr(diffusers, DIFFUSERS_CLASSES[comp][1])
                module = cls.from_pretrained(str(sub), local_files_only=True, use_safetensors=True)
            else:
                import torch
                import transformers

                cls = getattr(transformers, DIFFUSERS_CLASSES[comp][1])
                # transformers 5 loads in the config's dtype (float16 for the published SDXL
                # encoders); bigasp works in fp32 like the diffusers components and casts later.
                module = cls.from_pretrained(
                    str(sub), local_files_only=True, use_safetensors=True, dtype=torch.float32
                )
        except Exception as err:  # OSError, ValueError, safetensors' own SafetensorError, ...
            if isinstance(err, ImportError | MemoryError):
                raise
            raise ModelLoadError(f"could not load {sub}: {type(err).__name__}: {err}") from None
        setattr(model, comp, module.eval())
    return model


def save_diffusers_folder(
    model: SDXL, path: str | os.PathLike, *, preset_for_missing: str | None = None
) -> Path:
    """Write `model` as a diffusers folder (safetensors) plus `bigasp_model.json`.

    Components the bundle does not hold are omitted from `model_index.json`; tokenizers and a
    scheduler config are always written so diffusers' `StableDiffusionXLPipeline` can open it.
    The caller is responsible for atomicity (checkpoints write into a temp dir and rename).
    """
    from bigasp.text.tokenizer import tokenizer_dir, write_slow_tokenizer_files

    progress.quiet_libraries()
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, object] = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.31.0"}
    for comp, module in model.modules().items():
        module.save_pretrained(str(out / comp), safe_serialization=True)
        index[comp] = list(DIFFUSERS_CLASSES[comp])
    for tok, pad in (("tokenizer", None), ("tokenizer_2", "!")):
        shutil.copytree(tokenizer_dir(), out / tok, dirs_exist_ok=True)
        write_slow_tokenizer_files(out / tok)
        if pad is not None:
            cfg_path = out / tok / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["pad_token"] = pad
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        index[tok] = list(DIFFUSERS_CLASSES[tok])
    (out / "scheduler").mkdir(exist_ok=True)
    sched = component_config(preset_for_missing or "sdxl-base", "scheduler")
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    index["scheduler"] = list(DIFFUSERS_CLASSES["scheduler"])
    for comp in ("vae", "text_encoder", "text_encoder_2", "unet"):
        index.setdefault(comp, [None, None])
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    model.kind.save(out)
    for f in out.rglob("*"):  # safetensors writes its files 0600; a model folder is for sharing
        if f.is_file():
            usual_mode(f)
    return out
