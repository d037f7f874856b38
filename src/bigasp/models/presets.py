"""Model presets built from shipped configs: no download, randomly initialised.

`sdxl-base` holds the exact published SDXL 1.0 configs (UNet, VAE, CLIP ViT-L, OpenCLIP
bigG with projection); `tiny` is the same architecture family at a few MB for CPU tests
and the demo. A preset is data (JSON files), never an `if tiny:` branch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from bigasp.errors import ModelLoadError
from bigasp.models.components import SDXL, ModelKind


def _discover() -> tuple[str, ...]:
    root = resources.files("bigasp.models") / "configs"
    return tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "unet.json").is_file()))


PRESETS = _discover()  # one folder per preset under models/configs/
COMPONENT_FILES = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")


def preset_dir(name: str) -> Path:
    if name not in PRESETS:
        raise ModelLoadError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Path(str(resources.files("bigasp.models") / "configs" / name))


@cache
def _read(name: str, component: str) -> str:
    return (preset_dir(name) / f"{component}.json").read_text()


def component_config(name: str, component: str) -> dict[str, Any]:
    """A fresh copy of one component's published config for preset `name`."""
    if component not in COMPONENT_FILES:
        raise ModelLoadError(f"unknown component {component!r}; choose one of {', '.join(COMPONENT_FILES)}")
    return json.loads(_read(name, component))


def build_component(config: dict[str, Any], component: str) -> torch.nn.Module:
    """Instantiate one component from a config dict (diffusers or transformers format)."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    if component == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(cfg)
    if component == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_config(cfg)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # Published configs say float16 (the released weights' dtype); bigasp builds in fp32
    # and casts explicitly where a stage wants lower precision.
    for key in ("architectures", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    tcfg = CLIPTextConfig(**cfg)
    cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
    return cls(tcfg)


def build_preset(
    name: str,
    components: Iterable[str] = SDXL.COMPONENTS,
    *,
    seed: int = 0,
    kind: ModelKind | None = None,
    device: str | torch.device = "cpu",
) -> SDXL:
    """Randomly initialised SDXL components of preset `name`, deterministic for `seed`.

    `device="meta"` builds shapes only (no memory), for inspecting the real SDXL on a laptop.
    """
    model = SDXL(kind=kind or ModelKind(), source=f"preset:{name}")
    for i, comp in enumerate(components):
        torch.manual_seed(seed + i)
        with torch.device(device):
            module = build_component(component_config(name, comp), comp)
        setattr(model, comp, module.eval())
    return model
