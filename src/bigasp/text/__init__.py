"""Text side of SDXL: the shipped CLIP tokenizer and 75-token chunking."""

from bigasp.text.chunking import ChunkedTokens, chunk_batch, chunk_ids, n_chunks_for
from bigasp.text.tokenizer import (
    BOS,
    CHUNK_CONTENT,
    CHUNK_LEN,
    EOS,
    TE1_PAD,
    TE2_PAD,
    clip_tokenizer,
    tokenize,
)

__all__ = [
    "BOS",
    "CHUNK_CONTENT",
    "CHUNK_LEN",
    "EOS",
    "TE1_PAD",
    "TE2_PAD",
    "ChunkedTokens",
    "chunk_batch",
    "chunk_ids",
    "clip_tokenizer",
    "n_chunks_for",
    "tokenize",
]
