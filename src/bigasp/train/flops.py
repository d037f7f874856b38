"""Model FLOPs per training sample, counted once per batch shape on the `meta` device.

The count is the MFU convention of docs/PERFORMANCE.md and ../shared/reference/performance.md:
matmul/conv/attention FLOPs only (2 per multiply-add, `torch.utils.flop_counter`), a trained
component costs 3x its forward (forward + backward for inputs and weights; measured 3.00x on
the SDXL UNet), a frozen one 1x, and gradient-checkpointing recompute is not counted. The
count runs on meta copies of the networks (no memory, no compute on the accelerator), at
batch 1, and is cached per (latent height, latent width, chunks); FLOPs are linear in batch.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.flop_counter import FlopCounterMode

from bigasp.models.components import SDXL

log = logging.getLogger(__name__)


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    with torch.device("meta"):
        if hasattr(module, "from_config") and hasattr(module, "config"):  # diffusers
            return type(module).from_config(module.config).eval()
        return type(module)(module.config).eval()  # transformers


class FlopCounter:
    def __init__(self, model: SDXL, cfg):
        self.model = model
        self.train_te1 = cfg.model.train_text_encoder
        self.train_te2 = cfg.model.train_text_encoder_2
        self._meta: tuple[torch.nn.Module, ...] | None = None
        self._cache: dict[tuple[int, int, int], float] = {}

    def per_sample(self, h: int, w: int, n_chunks: int) -> float:
        """Training FLOPs of one sample with a [4, h, w] latent and `n_chunks` prompt chunks."""
        key = (h, w, n_chunks)
        if key not in self._cache:
            self._cache[key] = self._count(h, w, n_chunks)
        return self._cache[key]

    def per_batch(self, batch) -> float:
        b, _, h, w = batch.latents.shape
        return b * self.per_sample(int(h), int(w), int(batch.te1_ids.shape[1]))

    def _count(self, h: int, w: int, n: int) -> float:
        if self._meta is None:
            m = self.model
            self._meta = (_meta_copy(m.unet), _meta_copy(m.text_encoder), _meta_copy(m.text_encoder_2))
        unet, te1, te2 = self._meta
        with torch.no_grad(), torch.device("meta"):
            ids = torch.zeros(1, n, 77, dtype=torch.long)
            with FlopCounterMode(display=False) as fc1:
                out1 = te1(ids.view(n, 77), output_hidden_states=True)
            with FlopCounterMode(display=False) as fc2:
                out2 = te2(ids.view(n, 77), output_hidden_states=True)
            embeds = torch.cat(
                [
                    out1.hidden_states[-2].reshape(1, n * 77, -1),
                    out2.hidden_states[-2].reshape(1, n * 77, -1),
                ],
                -1,
            )
            pooled = out2.text_embeds[:1]
            x = torch.zeros(1, unet.config.in_channels, h, w)
            with FlopCounterMode(display=False) as fcu:
                unet(
                    x,
                    torch.zeros(1),
                    encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.zeros(1, 6)},
                )
        total = (
            3 * fcu.get_total_flops()
            + (3 if self.train_te1 else 1) * fc1.get_total_flops()
            + (3 if self.train_te2 else 1) * fc2.get_total_flops()
        )
        log.debug("model FLOPs per sample at latent %dx%d, %d chunk(s): %.3e", h, w, n, total)
        return float(total)


__all__ = ["FlopCounter"]
