"""NovelAI-style long-prompt chunking, exactly as bigASP trained and ComfyUI samples.

The content token stream (no BOS/EOS) is split every 75 tokens; each chunk becomes
`[BOS] + up to 75 tokens + [EOS] + pad` = 77 ids. An empty prompt is one chunk
`[BOS, EOS, pad...]`. A batch is padded to its longest prompt's chunk count with whole
empty chunks. Prompts longer than `max_chunks` are truncated and counted (never silently).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bigasp.text.tokenizer import BOS, CHUNK_CONTENT, CHUNK_LEN, EOS, TE1_PAD, TE2_PAD

log = logging.getLogger(__name__)


def n_chunks_for(n_tokens: int) -> int:
    """Chunks needed for `n_tokens` content tokens (an empty prompt still takes one)."""
    return max(1, -(-n_tokens // CHUNK_CONTENT))


def chunk_ids(ids: Sequence[int], *, pad_id: int, n_chunks: int | None = None) -> np.ndarray:
    """One prompt's content ids -> `[n_chunks, 77]` int64 array.

    `n_chunks` larger than needed appends empty chunks (`[BOS, EOS, pad...]`); smaller
    truncates the stream to `75 * n_chunks` tokens.
    """
    need = n_chunks_for(len(ids))
    n = need if n_chunks is None else n_chunks
    out = np.full((n, CHUNK_LEN), pad_id, dtype=np.int64)
    out[:, 0] = BOS
    for k in range(n):
        part = ids[k * CHUNK_CONTENT : (k + 1) * CHUNK_CONTENT]
        out[k, 1 : 1 + len(part)] = part
        out[k, 1 + len(part)] = EOS
    return out


@dataclass(frozen=True)
class ChunkedTokens:
    """Token ids for both SDXL encoders, `[B, n_chunks, 77]` each."""

    te1: torch.Tensor
    te2: torch.Tensor
    n_tokens: list[int]  # content tokens per prompt before truncation
    n_truncated: int  # prompts that lost tokens to `max_chunks`

    @property
    def n_chunks(self) -> int:
        return int(self.te1.shape[1])


def chunk_batch(
    token_lists: Sequence[Sequence[int]],
    *,
    max_chunks: int | None = 3,
    min_chunks: int = 1,
    warn: bool = True,
) -> ChunkedTokens:
    """Chunk a batch of content-id lists, padded to the longest prompt's chunk count.

    `max_chunks=None` means no limit (generation); training uses 3 (225 tokens, as bigASP).
    The truncation count is always returned; `warn=False` is for callers that aggregate
    and report it themselves (the training data loader).
    """
    lengths = [len(t) for t in token_lists]
    n = max([min_chunks, *(n_chunks_for(x) for x in lengths)])
    truncated = 0
    if max_chunks is not None and n > max_chunks:
        truncated = sum(1 for x in lengths if x > max_chunks * CHUNK_CONTENT)
        if warn:
            log.warning(
                "%d prompt(s) longer than %d tokens were truncated to %d chunks",
                truncated,
                max_chunks * CHUNK_CONTENT,
                max_chunks,
            )
        n = max_chunks
    te1 = np.stack([chunk_ids(t, pad_id=TE1_PAD, n_chunks=n) for t in token_lists]) if token_lists else None
    if te1 is None:
        empty = torch.empty((0, n, CHUNK_LEN), dtype=torch.long)
        return ChunkedTokens(empty, empty.clone(), [], 0)
    # TE2 pads with 0 instead of EOS. The pad positions follow from the content lengths, not
    # from "after the first EOS": a prompt may contain the literal text <|endoftext|>, which
    # CLIP's tokenizer turns into id 49407 inside the content (and which must stay content).
    kept = np.minimum(np.asarray(lengths, dtype=np.int64), n * CHUNK_CONTENT)
    per_chunk = np.clip(kept[:, None] - CHUNK_CONTENT * np.arange(n)[None, :], 0, CHUNK_CONTENT)
    pad = np.arange(CHUNK_LEN)[None, None, :] > per_chunk[:, :, None] + 1
    te2 = np.where(pad, TE2_PAD, te1)
    return ChunkedTokens(torch.from_numpy(te1), torch.from_numpy(te2), lengths, truncated)
