"""The shipped tokenizer is CLIP's BPE: known ids, vocabulary, specials, per-encoder padding.

The strongest check re-implements OpenAI's CLIP BPE from its published merge list
(`scripts/bpe_simple_vocab_16e6.txt.gz`) in a few lines of plain Python and requires the
fast tokenizer bigasp ships to agree on every id for a varied set of texts.
"""

from __future__ import annotations

import gzip
import itertools
from functools import cache
from pathlib import Path

import pytest

from bigasp.text import BOS, EOS, TE1_PAD, TE2_PAD, chunk_batch, clip_tokenizer, tokenize
from bigasp.text import tokenizer as tokenizer_module
from bigasp.text.tokenizer import (
    VOCAB_SIZE,
    hf_clip_tokenizer,
    tokenize_reference,
    tokenizer_dir,
    write_slow_tokenizer_files,
)

BPE_GZ = Path(__file__).resolve().parents[1] / "scripts" / "bpe_simple_vocab_16e6.txt.gz"


def test_known_ids_for_a_photo_of_a_cat():
    assert tokenize(["a photo of a cat"]) == [[320, 1125, 539, 320, 2368]]
    with_specials = clip_tokenizer()("a photo of a cat")["input_ids"]
    assert with_specials == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_vocabulary_and_special_tokens():
    tok = clip_tokenizer()
    assert len(tok) == VOCAB_SIZE == 49408
    assert (BOS, EOS) == (49406, 49407)
    assert tok.convert_ids_to_tokens([BOS, EOS]) == ["<|startoftext|>", "<|endoftext|>"]
    assert tok.bos_token_id == BOS and tok.eos_token_id == EOS
    # SDXL tokenizer_2 pads with "!" (id 0); tokenizer 1 pads with <|endoftext|>.
    assert TE1_PAD == EOS and TE2_PAD == 0
    assert tok.convert_ids_to_tokens([0, 320, 1125]) == ["!", "a</w>", "photo</w>"]


def test_normalisation_lowercases_and_collapses_whitespace():
    a, b = tokenize(["a photo of a cat", "  A   Photo\tof a CAT "])
    assert a == b


def test_empty_and_batch():
    assert tokenize([]) == []
    assert tokenize(["", "cat"]) == [[], [2368]]


def test_long_text_is_not_truncated_by_the_tokenizer():
    ids = tokenize(["cat " * 300])[0]
    assert ids == [2368] * 300


def test_slow_tokenizer_files_give_the_same_ids(tmp_path):
    """Saved model folders also carry vocab.json/merges.txt: transformers' CLIPTokenizer built
    from those alone (no tokenizer.json) agrees with the shipped fast tokenizer."""
    import shutil

    from transformers import CLIPTokenizer

    shutil.copy(tokenizer_dir() / "tokenizer_config.json", tmp_path)
    write_slow_tokenizer_files(tmp_path)
    slow = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    texts = ["a photo of a cat", "Don't PANIC!!  (masterpiece:1.2), 1girl, 3d render", "naïve café — ok"]
    for text in texts:
        assert slow(text)["input_ids"] == clip_tokenizer()(text)["input_ids"], text


def test_per_encoder_padding_matches_sdxl_tokenizers():
    """te1/te2 rows equal what SDXL's tokenizer / tokenizer_2 (pad "!") produce at max_length 77."""
    text = "a photo of a cat, sitting on a red sofa"
    tok1, tok2 = hf_clip_tokenizer(), hf_clip_tokenizer(pad_token="!")
    ref1 = tok1(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
    ref2 = tok2(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
    chunked = chunk_batch(tokenize([text]))
    assert chunked.te1[0, 0].tolist() == ref1
    assert chunked.te2[0, 0].tolist() == ref2
    assert ref2[-1] == 0 and ref1[-1] == EOS


# --- an independent CLIP BPE, written from the algorithm's description ---------------------


@cache
def _reference_tables() -> tuple[dict[str, int], dict[tuple[str, str], int], dict[int, str]]:
    # GPT-2/CLIP map every byte to a printable character so BPE works on text: printable
    # bytes map to themselves, the rest to 256, 257, ... in byte order. The vocabulary is
    # those 256 symbols, the same with the end-of-word marker, one entry per merge, specials.
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    order = keep + [b for b in range(256) if b not in keep]
    byte_char = {b: chr(b) if b in keep else chr(256 + order.index(b) - len(keep)) for b in order}
    with gzip.open(BPE_GZ, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = [byte_char[b] for b in order]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, {m: r for r, m in enumerate(merges)}, byte_char


def _reference_bpe_word(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Repeatedly merge the adjacent pair with the lowest merge rank, all its occurrences at once."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pair = min(itertools.pairwise(parts), key=lambda p: ranks.get(p, 1 << 30))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def reference_clip_ids(text: str) -> list[int]:
    import regex

    vocab, ranks, byte_char = _reference_tables()
    text = " ".join(text.split()).strip().lower()
    pattern = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    ids: list[int] = []
    for piece in regex.findall(pattern, text, regex.IGNORECASE):
        if piece in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(vocab[piece])
            continue
        word = "".join(byte_char[b] for b in piece.encode("utf-8"))
        ids.extend(vocab[p] for p in _reference_bpe_word(word, ranks))
    return ids


REFERENCE_TEXTS = [
    "a photo of a cat",
    "A photograph of a young woman standing in a sunlit kitchen, wearing a blue dress.",
    "1girl, solo, long hair, looking at viewer, smile, outdoors, score_8_up, masterpiece",
    "It's a dog's life: they'll say we've 2 cats & 13 dogs (really!) -- 50% off?!",
    "naïve café crème brûlée, Zürich, São Paulo, 東京タワー, emoji 🙂 ok",
    "photorealistic DSLR 85mm f/1.4 bokeh, ISO-100, HDR, 4k, 8K UHD, shot on Kodak Portra 400",
    "antidisestablishmentarianism supercalifragilisticexpialidocious pneumonoultramicroscopic",
    "",
]


@pytest.mark.skipif(not BPE_GZ.is_file(), reason="OpenAI BPE merge list not in this checkout")
@pytest.mark.parametrize("text", REFERENCE_TEXTS)
def test_shipped_tokenizer_equals_reference_clip_bpe(text):
    assert tokenize([text])[0] == reference_clip_ids(text)


# --- the fast path equals the shipped Rust tokenizer -----------------------------------------

TRICKY_TEXTS = [
    "ΟΔΟΣ ΣΑΣ",  # word-final capital sigma: lowered per character, as the Rust normaliser does
    "İstanbul ß ﬁne ﬀ ﬃ Ǆ ǅ",
    "e\u0301te\u0301 vs \u00e9t\u00e9",  # NFC composes
    "a\u00a0b\u2028c\u3000d\u200be\x1cf\x85g\ufeffh\x0bi",  # assorted whitespace / invisibles
    "tab\tnew\nline\r\n  end",
    "<|EndOfText|> is text but <|endoftext|> is special, <| alone",
    "ＦＵＬＬｗｉｄｔｈ １２３ Ⅻ ² ½ ٣",
    "don't I'LL it's WE'VE they'd",
    "’curly’ “quotes” — dash… 👩‍👩‍👧 ❤️",
]


@pytest.mark.parametrize("text", TRICKY_TEXTS + REFERENCE_TEXTS)
def test_fast_tokenize_equals_reference_tokenizer(text):
    assert tokenize([text]) == tokenize_reference([text])


def test_word_cache_is_bounded_and_stays_exact(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "_WORD_CACHE_MAX", 8)
    monkeypatch.setattr(tokenizer_module, "_word_cache", {})
    texts = [f"word{i} another{i}, yet more words number {i}" for i in range(20)]
    assert tokenize(texts) == tokenize_reference(texts)
    assert len(tokenizer_module._word_cache) <= 8
