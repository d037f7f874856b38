"""Rebuild the shipped CLIP tokenizer files from OpenAI's BPE merge list.

Why: bigasp must tokenize offline, exactly as SDXL's two tokenizers do. OpenAI's CLIP
repository publishes `bpe_simple_vocab_16e6.txt.gz` (MIT licence); its vocabulary is
defined by construction (256 byte symbols, the same with `</w>`, one entry per merge,
then the two special tokens). This script applies that construction and writes the
Hugging Face tokenizer files into the package, so anyone can reproduce them.

Usage: python scripts/build_clip_tokenizer.py [path/to/bpe_simple_vocab_16e6.txt.gz]
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "src" / "bigasp" / "text" / "data" / "clip"
N_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def build(bpe_gz: Path, out: Path) -> None:
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab_list) == 49408, len(vocab_list)
    vocab = {tok: i for i, tok in enumerate(vocab_list)}

    from transformers import CLIPTokenizer

    merge_lines = [tuple(m) for m in merges]
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=merge_lines,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    # Merges as "a b" strings: the form every tokenizers release reads (0.19 rejects the
    # [a, b] pairs newer releases write).
    path = out / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(vocab)} tokens)")


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "bpe_simple_vocab_16e6.txt.gz"
    build(src, OUT)
