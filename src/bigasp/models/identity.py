"""A VAE's identity: a hash of its weights, recorded with every latent it encodes.

Latents are only meaningful to the VAE that made them (and to its scaling factor): encoding a
dataset half with one VAE and half with another, or training a model whose VAE is not the
dataset's, trains silently on latents the model cannot decode. The identity lets encode refuse
mixing and the trainer check the model against the dataset.
"""

from __future__ import annotations

import hashlib

import torch


def vae_identity(vae: torch.nn.Module) -> str:
    """`vae-<16 hex>` over every weight's name, shape and fp32 value, in name order (the names and
    shapes pin the architecture). Config bookkeeping (saved path, library version, sample size)
    is left out, so the same VAE loaded from its folder, a full model folder or a single file has
    one identity. The scaling factor is recorded and checked on its own."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return "vae-" + h.hexdigest()[:16]
