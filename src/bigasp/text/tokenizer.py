"""The CLIP BPE tokenizer both SDXL text encoders use, loaded offline from package data.

SDXL's two tokenizers share one vocabulary (49,408 tokens; BOS 49406, EOS 49407) and
differ only in padding: text encoder 1 pads with EOS, text encoder 2 with id 0 ("!").
bigasp therefore keeps one tokenizer and applies the pad id per encoder when chunking.
The files under `data/clip/` are rebuilt by `scripts/build_clip_tokenizer.py`.
"""

from __future__ import annotations

import unicodedata
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


def hf_clip_tokenizer(*, pad_token: str = "<|endoftext|>", model_max_length: int = CHUNK_LEN):
    """A transformers fast tokenizer over the shipped `tokenizer.json`, built from the Rust
    `tokenizers.Tokenizer` directly.

    `CLIPTokenizer.from_pretrained` on this folder picks the *slow* Python tokenizer on
    transformers 4.x, which needs `vocab.json`/`merges.txt` and fails with a protobuf import
    error when only `tokenizer.json` is there; building from the Rust object works on every
    supported transformers version. `pad_token="!"` gives SDXL's tokenizer_2 (pads with id 0).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json")),
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token=pad_token,
        model_max_length=model_max_length,
    )


@lru_cache(maxsize=1)
def clip_tokenizer():
    """The fast (Rust) CLIP tokenizer from the shipped files; no network, cached per process.
    Long prompts are chunked by bigasp, never truncated by the tokenizer."""
    return hf_clip_tokenizer(model_max_length=1_000_000_000)


def write_slow_tokenizer_files(folder: str | Path) -> None:
    """`vocab.json` + `merges.txt` beside `tokenizer.json`, so that loaders asking for the
    slow `CLIPTokenizer` (diffusers on transformers 4.x, ComfyUI) can open the folder too."""
    import json

    model = json.loads((tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


# CLIP's pre-tokenizer pattern (contractions, letter runs, single digits, other-symbol runs).
# Whitespace never matches, so it only separates pieces.
_PIECE_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_WORD_CACHE_MAX = 200_000
_word_cache: dict[str, list[int]] = {}


@lru_cache(maxsize=1)
def _piece_regex():
    import regex

    return regex.compile(_PIECE_PATTERN)


def _word_ids(word: str) -> list[int]:
    ids = _word_cache.get(word)
    if ids is None:
        if len(_word_cache) >= _WORD_CACHE_MAX:
            _word_cache.clear()
        ids = _word_cache[word] = (
            clip_tokenizer().backend_tokenizer.encode(word, add_special_tokens=False).ids
        )
    return ids


def _lower(text: str) -> str:
    # The Rust normalizer lowercases character by character; Python's str.lower() applies
    # context rules (a word-final capital sigma becomes final sigma), so non-ASCII text is
    # lowered one character at a time to match.
    return text.lower() if text.isascii() else "".join(c.lower() for c in text)


def tokenize(texts: Sequence[str]) -> list[list[int]]:
    """Content token ids of each text, without BOS/EOS (the stream that chunking splits).

    Identical to the shipped CLIP tokenizer (`tokenize_reference`), about 5x faster: CLIP's
    normalisation and pre-tokenisation are done here (NFC, lowercase, the split pattern) and
    BPE runs once per distinct word (cached; captions reuse a small vocabulary of words).
    Texts that contain `<|` (possible special-token text) take the reference path.
    """
    if not texts:
        return []
    split = _piece_regex().findall
    out: list[list[int]] = []
    for text in texts:
        if "<|" in text:
            out.extend(tokenize_reference([text]))
            continue
        if not text.isascii():
            text = unicodedata.normalize("NFC", text)
        ids: list[int] = []
        for word in split(_lower(text)):
            cached = _word_cache.get(word)
            ids += cached if cached is not None else _word_ids(word)
        out.append(ids)
    return out


def tokenize_reference(texts: Sequence[str]) -> list[list[int]]:
    """The shipped Hugging Face CLIP tokenizer, text by text in Rust; `tokenize` must equal it."""
    if not texts:
        return []
    enc = clip_tokenizer()(list(texts), add_special_tokens=False, truncation=False)
    return [list(ids) for ids in enc["input_ids"]]
