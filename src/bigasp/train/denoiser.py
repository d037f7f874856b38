"""The trainable forward pass: token ids + micro-conditioning + noisy latents -> UNet output.

One `nn.Module` holding the UNet and both text encoders, so DDP wraps (and syncs the gradients
of) exactly what trains, and the same forward serves training, validation and FLOP counting.
"""

from __future__ import annotations

import torch
from torch import nn

from bigasp.models.conditioning import encode_tokens
from bigasp.text import ChunkedTokens


def time_ids_from(original_size: torch.Tensor, crop: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """SDXL add_time_ids [B, 6] = (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    The batch tensors are already (height, width) / (top, left), the order `sdxl_time_ids` uses.
    """
    return torch.cat([original_size, crop, target_size], dim=1).float()


class Denoiser(nn.Module):
    def __init__(self, unet: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        te1_ids: torch.Tensor,
        te2_ids: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        tokens = ChunkedTokens(te1=te1_ids, te2=te2_ids, n_tokens=[], n_truncated=0)
        cond = encode_tokens(self.text_encoder, self.text_encoder_2, tokens)
        # Frozen encoders may be stored in bf16/fp16; the UNet's fp32 master weights want fp32
        # inputs outside autocast (inside autocast this cast is free).
        return self.unet(
            x_t,
            timesteps,
            encoder_hidden_states=cond.embeds.float(),
            added_cond_kwargs={"text_embeds": cond.pooled.float(), "time_ids": time_ids},
        ).sample
