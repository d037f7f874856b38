"""The CLIP BPE tokenizer both SDXL text encoders use, loaded offline from package data.

SDXL's two tokenizers share one vocabulary (49,408 tokens; BOS 49406, EOS 49407) and
differ only in padding: text encoder 1 pads with EOS, text encoder 2 with id 0 ("!").
bigasp therefore keeps one tokenizer and applies the pad id per encoder when chunking.
The files under `data/clip/` are rebuilt by `scripts/build_clip_tokenizer.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

BOS = 49406
EOS = 49407
TE1_PAD = EOS
TE2_PAD = 0
CHUNK_CONTENT = 75  # content tokens per chunk
CHUNK_LEN = CHUNK_CONTENT + 2  # BOS + content + EOS (+ pad)
VOCAB_SIZE = 49408


def tokenizer_dir() -> Path:
    return Path(str(resources.files("bigasp.text") / "data" / "clip"))


@lru_cache(maxsize=1)
def clip_tokenizer():
    """The fast (Rust) CLIP tokenizer from the shipped files; no network, cached per process."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    # Long prompts are chunked by bigasp, never truncated by the tokenizer.
    tok.model_max_length = 1_000_000_000
    return tok


def tokenize(texts: Sequence[str]) -> list[list[int]]:
    """Content token ids of each text, without BOS/EOS (the stream that chunking splits)."""
    if not texts:
        return []
    enc = clip_tokenizer()(list(texts), add_special_tokens=False, truncation=False)
    return [list(ids) for ids in enc["input_ids"]]
