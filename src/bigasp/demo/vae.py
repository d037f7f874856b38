"""The demo's shipped VAE: architecture, location, and how well it reconstructs.

The architecture is the `demo` model preset's `vae.json` (one source of truth); the trained
weights live in `assets/vae/` as a plain diffusers folder, so `bigasp encode --vae <folder>`
and `AutoencoderKL.from_pretrained` read it like any other VAE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bigasp.models.presets import component_config

DEMO_VAE_DIR = Path(__file__).resolve().parent / "assets" / "vae"
VAE_CONFIG = {k: v for k, v in component_config("demo", "vae").items() if not k.startswith("_")}


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1] (the SDXL VAE's input range)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def load_demo_vae(path: str | Path = DEMO_VAE_DIR):
    """The trained demo VAE (fp32, eval mode)."""
    from diffusers import AutoencoderKL

    from bigasp.errors import ModelLoadError

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"demo VAE not found at {path}; run `python scripts/train_demo_vae.py` to create it"
        )
    return AutoencoderKL.from_pretrained(str(path), local_files_only=True, use_safetensors=True).eval()


@torch.no_grad()
def reconstruction_error(vae, images: torch.Tensor) -> float:
    """Mean absolute error (in [-1, 1] units) of encode-mean -> decode over a batch [B,3,H,W]."""
    z = vae.encode(images).latent_dist.mean
    return float((vae.decode(z).sample.clamp(-1, 1) - images).abs().mean())
