"""The shipped demo VAE reconstructs unseen synthetic photos; a random-init VAE of the same
architecture does not. Thresholds sit between the two (measured: see docs/demo.md)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from bigasp.demo import metrics
from bigasp.demo.synthetic import photo_spec, render
from bigasp.demo.vae import DEMO_VAE_DIR, VAE_CONFIG, image_to_tensor, load_demo_vae, reconstruction_error

MAX_ERROR = 0.12  # mean |error| in [-1, 1] units on clean photos; random init: ~0.5


@pytest.fixture(scope="module")
def vae():
    return load_demo_vae()


def fresh_photos(size: tuple[int, int], n: int = 12, seed: int = 4242):
    """Clean photos the VAE never saw (its training data used seed 1234), resized to `size` (w, h)."""
    specs = [photo_spec(i, seed=seed, degraded_fraction=0.0) for i in range(n)]
    imgs = [render(s, seed=seed).resize(size, Image.Resampling.LANCZOS) for s in specs]
    return specs, torch.stack([image_to_tensor(im) for im in imgs])


def test_shipped_files_are_small_sdxl_family():
    cfg = json.loads((DEMO_VAE_DIR / "config.json").read_text())
    assert cfg["latent_channels"] == 4 and len(cfg["block_out_channels"]) == 4  # 8x downsampling
    assert cfg["block_out_channels"] == VAE_CONFIG["block_out_channels"]  # matches the demo preset
    size = (DEMO_VAE_DIR / "diffusion_pytorch_model.safetensors").stat().st_size
    assert 100_000 < size < 5_000_000


@torch.no_grad()
def test_reconstructs_unseen_photos_and_random_init_does_not(vae):
    torch.manual_seed(0)
    random_vae = type(vae).from_config(VAE_CONFIG).eval()
    for size in ((64, 64), (48, 80)):
        specs, x = fresh_photos(size)
        trained = reconstruction_error(vae, x)
        untrained = reconstruction_error(random_vae, x)
        assert trained < MAX_ERROR, (size, trained)
        assert untrained > 2 * MAX_ERROR, (size, untrained)
        # What the demo relies on: the decoded colour is the photo's colour.
        z = vae.encode(x).latent_dist.mean
        assert z.shape == (len(specs), 4, size[1] // 8, size[0] // 8)
        rec = vae.decode(z).sample.clamp(-1, 1)
        from bigasp.demo.vae import tensor_to_image

        colours = [metrics.dominant_colour(tensor_to_image(r)) for r in rec]
        assert sum(c == s.colour for c, s in zip(colours, specs, strict=True)) >= len(specs) - 1, colours


@torch.no_grad()
def test_scaling_factor_gives_unit_std_latents(vae):
    _, x = fresh_photos((64, 64), n=16)
    z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    assert 0.7 < float(z.std()) < 1.4
