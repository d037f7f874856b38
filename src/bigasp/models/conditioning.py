"""Prompt -> SDXL conditioning, exactly as SDXL was trained and ComfyUI samples.

Text: both encoders' penultimate hidden states (no final layer norm), every 77-token chunk
encoded independently, chunks concatenated along the sequence axis per encoder, then
`[768 | 1280]` concatenated on features -> `[B, 77*n, 2048]`. Pooled = text encoder 2's
projected pooled output of the first chunk. The empty prompt is the encoding of "" (bigASP
trains unconditional dropout with empty strings, not zeroed embeddings).

Micro-conditioning: `time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)`.
`sdxl_time_ids` takes keyword-only named sizes so height/width cannot be swapped (bigASP's
own code swapped them and patched it with a reversal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from bigasp.text import ChunkedTokens, chunk_batch, tokenize


class Size(NamedTuple):
    """Pixel size, height first as SDXL's time_ids are."""

    height: int
    width: int


class Crop(NamedTuple):
    """Crop offset in resized-image pixel coordinates."""

    top: int
    left: int


def sdxl_time_ids(
    *,
    original_size: Size | Sequence[Size],
    crop: Crop | Sequence[Crop],
    target_size: Size | Sequence[Size],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SDXL `add_time_ids`, `[B, 6]`: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    Accepts one size/crop or a sequence of them (one per batch element); singletons are
    broadcast to the batch length.
    """

    def as_list(x, cls):
        if isinstance(x, tuple) and len(x) == 2 and all(isinstance(v, int | float) for v in x):
            return [cls(*x)]
        return [cls(*v) for v in x]

    orig, crops, targets = as_list(original_size, Size), as_list(crop, Crop), as_list(target_size, Size)
    n = max(len(orig), len(crops), len(targets))
    for name, seq in (("original_size", orig), ("crop", crops), ("target_size", targets)):
        if len(seq) not in (1, n):
            raise ValueError(f"{name} has {len(seq)} entries, expected 1 or {n}")
    rows = []
    for i in range(n):
        o, c, t = orig[i % len(orig)], crops[i % len(crops)], targets[i % len(targets)]
        rows.append([o.height, o.width, c.top, c.left, t.height, t.width])
    return torch.tensor(rows, dtype=dtype, device=device)


@dataclass
class TextConditioning:
    """Text conditioning for one batch: `embeds [B, 77*n, 2048]`, `pooled [B, 1280]`."""

    embeds: torch.Tensor
    pooled: torch.Tensor


def encode_tokens(text_encoder, text_encoder_2, tokens: ChunkedTokens) -> TextConditioning:
    """Encode pre-chunked ids with both encoders (gradients flow if the encoders train)."""
    b, n, length = tokens.te1.shape
    dev1 = next(text_encoder.parameters()).device
    dev2 = next(text_encoder_2.parameters()).device
    ids1 = tokens.te1.reshape(b * n, length).to(dev1)
    ids2 = tokens.te2.reshape(b * n, length).to(dev2)
    out1 = text_encoder(ids1, output_hidden_states=True)
    out2 = text_encoder_2(ids2, output_hidden_states=True)
    h1 = out1.hidden_states[-2].reshape(b, n * length, -1)
    h2 = out2.hidden_states[-2].reshape(b, n * length, -1).to(h1.device)
    pooled = out2.text_embeds.reshape(b, n, -1)[:, 0]
    return TextConditioning(embeds=torch.cat([h1, h2.to(h1.dtype)], dim=-1), pooled=pooled)


def encode_prompts(
    text_encoder,
    text_encoder_2,
    prompts: Sequence[str],
    *,
    max_chunks: int | None = None,
    min_chunks: int = 1,
) -> TextConditioning:
    """Tokenize, chunk and encode plain prompts (no weight syntax)."""
    tokens = chunk_batch(tokenize(prompts), max_chunks=max_chunks, min_chunks=min_chunks)
    return encode_tokens(text_encoder, text_encoder_2, tokens)
