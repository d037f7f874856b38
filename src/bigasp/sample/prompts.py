"""Prompt weight syntax and weighted SDXL text encoding.

Two syntaxes, because users paste prompts from both worlds:

* `comfy` (default; ComfyUI core): `(text)` ×1.1 per level, `(text:1.3)` *replaces* the
  weight, `\\(` `\\)` are literal parentheses, `[text]` is plain text, an unclosed `(`
  leaves the rest literal. Weights act as `z = (z - z_empty)·w + z_empty`, position-wise
  against the encoding of the empty prompt.
* `a1111` (AUTOMATIC1111): brackets multiply (`(x:1.3)` inside `( )` gives 1.43),
  `[text]` ÷1.1, unclosed brackets weight to the end, `BREAK` starts a new 75-token chunk.
  Weights act as `z *= w`, then each chunk's mean is restored (per prompt, per encoder).

`none` encodes the text as written. Prompts are chunked every 75 tokens with no hard limit;
prompts past 225 tokens (what bigASP saw in training) get a warning. The default chunking is
ComfyUI's `tokenize_with_weights` (a short weighted segment moves whole to the next chunk at a
boundary, `embedding:NAME` puts textual-inversion vectors in place of tokens); `chunking=
"bigasp"` is the plain training-time split (the two agree for prompts without weights).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from bigasp.errors import ConfigError
from bigasp.sample.embeddings import PREFIX as EMBED_PREFIX
from bigasp.sample.embeddings import EmbeddingLibrary, EmbeddingVector
from bigasp.sample.embeddings import resolve as resolve_embedding
from bigasp.text import CHUNK_CONTENT, TE1_PAD, TE2_PAD, ChunkedTokens, chunk_ids, tokenize

log = logging.getLogger(__name__)

SYNTAXES = ("comfy", "a1111", "none")
MAX_WEIGHT = 100.0  # |weight| beyond this overflows the conditioning into a NaN (black) image
MAX_NESTING = 200  # deeper ( ) nesting is refused (1.1**200 is far past MAX_WEIGHT anyway)
CHUNKINGS = ("bigasp", "comfy")
COMFY_MAX_WORD = 8  # ComfyUI SDTokenizer.max_word_length
TRAINED_TOKENS = 225
BREAK = object()  # a forced chunk boundary (A1111)

# -- ComfyUI syntax ----------------------------------------------------------------------

_ESC_CLOSE, _ESC_OPEN = "\0\1", "\0\2"


def _split_parentheses(text: str) -> list[str]:
    """Top-level `( ... )` groups and plain runs; unbalanced input degrades to literal text."""
    parts: list[str] = []
    current = ""
    depth = 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if current:
                    parts.append(current)
                current = "("
            else:
                current += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                parts.append(current + ")")
                current = ""
            else:
                current += ch
        else:
            current += ch
    if current:
        parts.append(current)
    return parts


def _comfy_weights(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for part in _split_parentheses(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner = part[1:-1]
            w = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    w = float(inner[colon + 1 :])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _comfy_weights(inner, w)
        else:
            out.append((part, weight))
    return out


def _nesting(text: str) -> int:
    """Deepest `(` nesting as `_split_parentheses` counts it."""
    depth = deepest = 0
    for ch in text:
        if ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    return deepest


def parse_comfy(text: str) -> list[tuple[str, float]]:
    """ComfyUI `token_weights` on escaped text: [(segment, weight)], escapes resolved."""
    escaped = text.replace("\\)", _ESC_CLOSE).replace("\\(", _ESC_OPEN)
    if _nesting(escaped) > MAX_NESTING:
        raise ConfigError(
            f"prompt {_excerpt(text)} nests parentheses more than {MAX_NESTING} deep; "
            "use an explicit weight such as (text:1.5) instead"
        )
    return [
        (seg.replace(_ESC_CLOSE, ")").replace(_ESC_OPEN, "("), w) for seg, w in _comfy_weights(escaped, 1.0)
    ]


# -- A1111 syntax ------------------------------------------------------------------------

_A1111_TOKEN = re.compile(
    r"""\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:""", re.X
)
_A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_a1111(text: str) -> list[tuple[str, float] | object]:
    """A1111 `parse_prompt_attention`: [(segment, weight)] with `BREAK` markers, equal
    neighbouring weights merged."""
    res: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in res[start:]:
            if item[0] is not BREAK:
                item[1] *= factor

    for m in _A1111_TOKEN.finditer(text):
        tok, explicit = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            rounds.append(len(res))
        elif tok == "[":
            squares.append(len(res))
        elif explicit is not None and rounds:
            scale(rounds.pop(), float(explicit))
        elif tok == ")" and rounds:
            scale(rounds.pop(), 1.1)
        elif tok == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
        else:
            for i, piece in enumerate(_A1111_BREAK.split(tok)):
                if i > 0:
                    res.append([BREAK, -1.0])
                res.append([piece, 1.0])
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    merged: list[list] = []
    for item in res or [["", 1.0]]:
        if merged and item[0] is not BREAK and merged[-1][0] is not BREAK and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [BREAK if seg is BREAK else (seg, w) for seg, w in merged]


def _excerpt(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "…")


def check_weights(text: str, items: Sequence[tuple[str, float] | object]) -> None:
    """Refuse weights that cannot give an image: not finite, or beyond ±MAX_WEIGHT."""
    for it in items:
        if it is BREAK:
            continue
        seg, w = it
        if not math.isfinite(w) or abs(w) > MAX_WEIGHT:
            raise ConfigError(
                f"prompt {_excerpt(text)}: weight {w:g} of {_excerpt(seg.strip(), 20)} is out of range; "
                f"weights must be finite numbers between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}"
            )


def parse(text: str, syntax: str = "comfy") -> list[tuple[str, float] | object]:
    """Weighted segments of `text`; a ConfigError for weights that cannot give an image."""
    if syntax == "comfy":
        items = parse_comfy(text)
    elif syntax == "a1111":
        items = parse_a1111(text)
    elif syntax == "none":
        return [(text, 1.0)]
    else:
        raise ValueError(f"unknown prompt syntax {syntax!r}; choose one of {', '.join(SYNTAXES)}")
    check_weights(text, items)
    return items


# -- tokens, chunks, weights -------------------------------------------------------------


Token = int | EmbeddingVector
# ComfyUI's tokenizer starts an embedding at the start of a weighted segment or after any
# whitespace (comfy/sd1_clip.py splits on `(?<=\s)embedding:`); elsewhere `embedding:NAME` is text.
_EMBED_SPLIT = re.compile(r"(?<=\s)" + re.escape(EMBED_PREFIX))


def _embedding_groups(segment: str, library: EmbeddingLibrary) -> list[list[Token]]:
    """ComfyUI's `embedding:` handling of one weighted segment: the segment splits before every
    `embedding:` that follows whitespace; each embedding is a group of its vectors,
    its leftover text a group of tokens; a missing embedding is dropped with a warning."""
    pieces = _EMBED_SPLIT.split(segment)
    words = [w for w in [pieces[0], *(EMBED_PREFIX + p for p in pieces[1:])] if w]
    groups: list[list[Token]] = []
    for word in words:
        if word.startswith(EMBED_PREFIX):
            name, rows, leftover = resolve_embedding(word, library)
            if name is not None:
                groups.append([EmbeddingVector(name, r) for r in range(rows)])
            if not leftover:
                continue
            word = leftover
        groups.append(list(tokenize([word])[0]))
    return groups


def prompt_chunks(
    text: str, syntax: str = "comfy", chunking: str = "comfy", embeddings: EmbeddingLibrary | None = None
) -> list[tuple[list[Token], list[float]]]:
    """One prompt -> content chunks of at most 75 (token, weight) pairs.

    `chunking="comfy"` is ComfyUI's `tokenize_with_weights`: each weighted segment is one group
    of tokens; a group of fewer than 8 tokens that does not fit closes the chunk early and
    moves whole to the next one (longer groups are split to fill the chunk). `"bigasp"` splits
    the token stream every 75 tokens, as bigASP trained. With the comfy syntax,
    `embedding:NAME` puts the vectors of a textual-inversion embedding in place of tokens.
    """
    if chunking not in CHUNKINGS:
        raise ValueError(f"unknown chunking {chunking!r}; choose one of {', '.join(CHUNKINGS)}")
    items = parse(text, syntax)
    segments = [it for it in items if it is not BREAK and it[0]]
    plain = [seg for seg, _ in segments if syntax != "comfy" or EMBED_PREFIX not in seg]
    ids_per_plain = iter(tokenize(plain))
    library = embeddings if embeddings is not None else EmbeddingLibrary(None)
    chunks: list[tuple[list[Token], list[float]]] = [([], [])]
    n_tokens = 0
    for it in items:
        if it is BREAK:
            chunks.append(([], []))
            continue
        seg, w = it
        if not seg:
            continue
        if syntax == "comfy" and EMBED_PREFIX in seg:
            groups = _embedding_groups(seg, library)
        else:
            groups = [list(next(ids_per_plain))]
        for group in groups:
            n_tokens += len(group)
            room = CHUNK_CONTENT - len(chunks[-1][0])
            if chunking == "comfy" and len(group) < COMFY_MAX_WORD and len(group) > room:
                chunks.append(([], []))
            for tok in group:
                if len(chunks[-1][0]) == CHUNK_CONTENT:
                    chunks.append(([], []))
                chunks[-1][0].append(tok)
                chunks[-1][1].append(w)
    if n_tokens > TRAINED_TOKENS:
        log.warning(
            "prompt has %d tokens; bigASP was trained on at most %d (the rest still counts, "
            "in extra 75-token chunks)",
            n_tokens,
            TRAINED_TOKENS,
        )
    return chunks


@dataclass
class WeightedTokens:
    """Chunked ids for both encoders plus the weight of every position ([B, n, 77]).

    `vectors` lists the positions `(prompt, chunk, position)` that an embedding fills (their
    ids are placeholders, EMBED_PLACEHOLDER)."""

    tokens: ChunkedTokens
    weights: torch.Tensor
    vectors: list[tuple[int, int, int, EmbeddingVector]] = field(default_factory=list)

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1.0).any())


EMBED_PLACEHOLDER = 0  # below EOS, so CLIP's pooling (first EOS / highest id) never picks it


def weighted_tokens(
    prompts: Sequence[str],
    syntax: str = "comfy",
    *,
    min_chunks: int = 1,
    chunking: str = "comfy",
    embeddings: EmbeddingLibrary | None = None,
) -> WeightedTokens:
    """Chunk a batch, padded with empty chunks to a common count (as `chunk_batch`)."""
    per_prompt = [prompt_chunks(p, syntax, chunking, embeddings) for p in prompts]
    n = max([min_chunks, *(len(c) for c in per_prompt)])
    b = len(prompts)
    te1 = np.empty((b, n, CHUNK_CONTENT + 2), dtype=np.int64)
    te2 = np.empty_like(te1)
    weights = np.ones(te1.shape, dtype=np.float32)
    vectors: list[tuple[int, int, int, EmbeddingVector]] = []
    for i, chunks in enumerate(per_prompt):
        for k in range(n):
            toks, ws = chunks[k] if k < len(chunks) else ([], [])
            ids = [EMBED_PLACEHOLDER if isinstance(t, EmbeddingVector) else t for t in toks]
            vectors += [(i, k, 1 + j, t) for j, t in enumerate(toks) if isinstance(t, EmbeddingVector)]
            te1[i, k] = chunk_ids(ids, pad_id=TE1_PAD, n_chunks=1)[0]
            te2[i, k] = chunk_ids(ids, pad_id=TE2_PAD, n_chunks=1)[0]
            weights[i, k, 1 : 1 + len(ws)] = ws
    lengths = [sum(len(ids) for ids, _ in c) for c in per_prompt]
    tokens = ChunkedTokens(torch.from_numpy(te1), torch.from_numpy(te2), lengths, 0)
    return WeightedTokens(tokens, torch.from_numpy(weights), vectors)


def apply_weights_comfy(z: torch.Tensor, z_empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`z = (z - z_empty)·w + z_empty` per position; z [B, 77n, C], z_empty [1, 77, C], w [B, 77n]."""
    n = z.shape[1] // z_empty.shape[1]
    base = z_empty.repeat(1, n, 1).to(z.dtype)
    w = weights.to(z.dtype).unsqueeze(-1)
    return torch.where(w != 1.0, (z - base) * w + base, z)


def apply_weights_a1111(
    z: torch.Tensor, weights: torch.Tensor, split: int, chunk_len: int = 77
) -> torch.Tensor:
    """`z *= w`, then restore each (prompt, chunk, encoder) block's mean; encoders split at `split`."""
    b, length, c = z.shape
    n = length // chunk_len
    zz = z.reshape(b, n, chunk_len, c)
    w = weights.reshape(b, n, chunk_len, 1).to(z.dtype)
    out = []
    for part in (zz[..., :split], zz[..., split:]):
        before = part.mean(dim=(2, 3), keepdim=True)
        scaled = part * w
        after = scaled.mean(dim=(2, 3), keepdim=True)
        out.append(scaled * (before / after))
    return torch.cat(out, dim=-1).reshape(b, length, c)


def _placed_vectors(
    wt: WeightedTokens, library: EmbeddingLibrary, encoder, key: str, ids: torch.Tensor, pad: int
):
    """Ids and (row, position, vectors) of one encoder's embeddings. A vector whose width is not
    the encoder's is dropped for that encoder and the chunk padded at its end (ComfyUI)."""
    width = encoder.get_input_embeddings().weight.shape[1]
    n = ids.shape[1]
    ids = ids.clone()
    rows, cols, vecs = [], [], []
    by_chunk: dict[tuple[int, int], list[tuple[int, EmbeddingVector]]] = {}
    for i, k, pos, ref in wt.vectors:
        by_chunk.setdefault((i, k), []).append((pos, ref))
    for (i, k), refs in by_chunk.items():
        dropped: list[int] = []
        for pos, ref in refs:
            v = library.vectors(ref.name, key)
            if v is None or v.shape[-1] != width or ref.row >= v.shape[0]:
                if pos not in dropped:
                    log.warning(
                        "embedding:%s has no %d-wide vector %d for %s; ignored for that encoder",
                        ref.name, width, ref.row, key,
                    )  # fmt: skip
                dropped.append(pos)
                continue
            rows.append(i * n + k)
            cols.append(pos - sum(1 for d in dropped if d < pos))
            vecs.append(v[ref.row])
        if dropped:
            keep = [t for p, t in enumerate(ids[i, k].tolist()) if p not in dropped]
            ids[i, k] = torch.tensor(keep + [pad] * len(dropped))
    if not rows:
        return ids, None
    return ids, (torch.tensor(rows), torch.tensor(cols), torch.stack(vecs))


@contextmanager
def _injected(encoder, placed):
    """Put embedding vectors into the encoder's token-embedding output at their positions."""
    if placed is None:
        yield
        return
    rows, cols, vecs = placed

    def hook(_module, _inputs, out):
        out = out.clone()
        out[rows.to(out.device), cols.to(out.device)] = vecs.to(out.device, out.dtype)
        return out

    handle = encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def encode_weighted(
    text_encoder,
    text_encoder_2,
    prompts: Sequence[str],
    syntax: str = "comfy",
    chunking: str = "comfy",
    embeddings: EmbeddingLibrary | None = None,
):
    """Prompts with weight syntax -> `TextConditioning` (pooled never weighted, as ComfyUI)."""
    from bigasp.models.conditioning import TextConditioning, encode_tokens

    library = embeddings if embeddings is not None else EmbeddingLibrary(None)
    wt = weighted_tokens(prompts, syntax, chunking=chunking, embeddings=library)
    tokens = wt.tokens
    if wt.vectors:
        te1, placed1 = _placed_vectors(wt, library, text_encoder, "clip_l", tokens.te1, TE1_PAD)
        te2, placed2 = _placed_vectors(wt, library, text_encoder_2, "clip_g", tokens.te2, TE2_PAD)
        tokens = ChunkedTokens(te1, te2, tokens.n_tokens, tokens.n_truncated)
        with _injected(text_encoder, placed1), _injected(text_encoder_2, placed2):
            cond = encode_tokens(text_encoder, text_encoder_2, tokens)
    else:
        cond = encode_tokens(text_encoder, text_encoder_2, tokens)
    if not wt.weighted:
        return cond
    w = wt.weights.reshape(len(prompts), -1).to(cond.embeds.device)
    z = cond.embeds.float()
    if syntax == "a1111":
        z = apply_weights_a1111(z, w, split=text_encoder.config.hidden_size)
    else:
        empty = weighted_tokens([""], "none").tokens
        z_empty = encode_tokens(text_encoder, text_encoder_2, empty).embeds.float()
        z = apply_weights_comfy(z, z_empty, w)
    return TextConditioning(embeds=z.to(cond.embeds.dtype), pooled=cond.pooled)
