"""Training-prompt synthesis: one prompt per (sample metadata, key), as bigASP built them.

bigASP's breadth (tags *and* natural language, 1 to 225 tokens, optional score tags) came
from rebuilding each sample's prompt every time it is seen. Its own code drew part of that
randomness from the worker-global `random` module, so prompts after a resume differed
from an uninterrupted run (reference/trainers.md §2.1). Here every draw comes from one
counter-based generator keyed by `(run_seed, epoch, sample_index)`: the same key gives the
same prompt on any rank, in any worker, after any resume, and no global RNG is touched.

The rules and every default, with its source, are listed in docs/prompts.md.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from bigasp.config import Section

if TYPE_CHECKING:
    from bigasp.text.aliases import AliasTable

# Key for prompts of held-out / stable evaluation batches: never a training epoch.
EVAL_EPOCH = -1

# bigASP's v2.5 card names six quality words but not the score -> word mapping; this
# default spreads the 0-9 score range over them (ours; configurable).
DEFAULT_QUALITY_WORDS = [
    "worst quality",  # 0
    "worst quality",  # 1
    "low quality",  # 2
    "low quality",  # 3
    "normal quality",  # 4
    "normal quality",  # 5
    "high quality",  # 6
    "high quality",  # 7
    "best quality",  # 8
    "masterpiece quality",  # 9
]

# Typical CLIP token cost of one quality element plus its separator, measured with the
# shipped tokenizer: "score_7_up," = 6, "score_7," = 4, "high quality," = 3.
_SCORE_TAG_TOKENS = 5.5
_QUALITY_WORD_TOKENS = 3.0

Prob = Field(ge=0.0, le=1.0)


class PromptConfig(Section):
    """`[data.prompt]`: how a training prompt is synthesised. Defaults = bigASP v2 (data.py)."""

    ucg_rate: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="P(prompt is the empty string). bigASP v2's data.py: 5% (what trained v2; the 10% on the "
        "model page, 'Training Details (Version 1)', was v1's rate).",
    )
    tag_prob: float = Field(
        0.1, ge=0.0, le=1.0, description="P(build the prompt from tags instead of a caption). bigASP v2: 0.1."
    )
    tag_count_match_prob: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description=(
            "P(tag count matches the caption's token length, n_tokens / tokens_per_tag) versus a draw from "
            "Normal(tag_count_mean, tag_count_std). bigASP v2 code: always match (1.0); v1: always Normal (0.0)."
        ),
    )
    tokens_per_tag: float = Field(2.5, gt=0.0, description="Average CLIP tokens per tag (bigASP v2: 2.5).")
    min_tags: int = Field(5, ge=1, description="Minimum tag count of a tag prompt (bigASP: 5).")
    tag_count_mean: float = Field(32.0, description="Mean of the Normal tag count (bigASP v1 card: 32).")
    tag_count_std: float = Field(
        19.8, ge=0.0, description="Std of the Normal tag count (bigASP v1 card: 19.8)."
    )
    priority_tags: list[str] = Field(
        default_factory=lambda: ["watermark"],
        description="Tags always kept (never sampled away, never aliased) when present. bigASP: ['watermark'].",
    )
    alias_prob: float = Field(
        0.2, ge=0.0, le=1.0, description="P(a tag is replaced by a random alias). bigASP: 0.2."
    )
    aliases_path: str | None = Field(
        None,
        description="Danbooru tag-alias dump (JSON lines, optionally .gz), or 'builtin:danbooru' for the table "
        "shipped with bigasp (the bigASP recipes set it; bigASP swapped aliases). None = no alias mutation.",
    )
    underscore_weights: list[float] = Field(
        default_factory=lambda: [1.0, 1.0, 1.0],
        description="Relative weights of the per-prompt underscore style [keep, spaces, mixed]. bigASP: uniform.",
    )
    mixed_space_prob: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="In the mixed style, P(a tag's underscores become spaces). bigASP: 0.8.",
    )
    separator_space_prob: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="P(a tag separator is ', ' rather than ','), drawn per separator. bigASP: 0.8.",
    )
    extra_tags: bool = Field(
        True,
        description="Append source, subreddit (+ 'reddit') and 'watermark' from metadata to the tags (bigASP).",
    )
    extra_sources: list[str] | None = Field(
        None,
        description=(
            "Sources that become a tag; None = any non-empty source. bigASP: fansly, flickr, onlyfans, unsplash."
        ),
    )
    quality: Literal["score_tags", "quality_words", "none"] = Field(
        "score_tags", description="score_tags = bigASP v2 (score_N, score_k_up); quality_words = v2.5 style."
    )
    score_tag_prob: float = Field(
        0.9, ge=0.0, le=1.0, description="P(score tags are prepended). bigASP v2: 0.9."
    )
    score_tag_count_weights: list[float] = Field(
        default_factory=lambda: [3.0, 2.0, 1.0],
        description="Relative weights of prepending 1, 2, 3 score tags. bigASP v2: 3:2:1.",
    )
    score_tag_space_prob: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="P(a score tag is written with spaces, 'score 7 up'). bigASP v2: 0.2.",
    )
    score_tag_separators: list[str] = Field(
        default_factory=lambda: [", ", " ", ","],
        description="Separators after each score tag, chosen uniformly. bigASP v2: ', ', ' ', ','.",
    )
    quality_word_prob: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="P(a quality word is inserted). v2.5 card: optional, rate unpublished; 0.9 mirrors score tags.",
    )
    quality_words: list[str] = Field(
        default_factory=lambda: list(DEFAULT_QUALITY_WORDS),
        description="Quality word for scores 0..9 (index = score). The v2.5 mapping is unpublished; ours.",
    )

    @field_validator("underscore_weights")
    @classmethod
    def _three_weights(cls, v: list[float]) -> list[float]:
        if len(v) != 3 or min(v) < 0 or sum(v) <= 0:
            raise ValueError("needs 3 non-negative weights [keep, spaces, mixed] with a positive sum")
        return v

    @field_validator("score_tag_count_weights")
    @classmethod
    def _count_weights(cls, v: list[float]) -> list[float]:
        if not v or min(v) < 0 or sum(v) <= 0:
            raise ValueError("needs non-negative weights for 1, 2, 3, ... score tags with a positive sum")
        return v

    @field_validator("score_tag_separators")
    @classmethod
    def _separators(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one separator")
        return v

    @field_validator("quality_words")
    @classmethod
    def _ten_words(cls, v: list[str]) -> list[str]:
        if len(v) != 10:
            raise ValueError("needs exactly 10 entries, one per score 0..9")
        return v


@dataclass(frozen=True)
class SampleMeta:
    """The metadata of one image that a prompt is built from (a row of the latent table)."""

    index: int
    captions: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    score: int | None = None
    source: str | None = None
    watermark: bool | None = None
    subreddit: str | None = None
    # Caption token count used for tag-count matching (ignored without captions); None = estimated.
    n_tokens: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, index: int, row: Mapping[str, Any], n_tokens: int | None = None) -> SampleMeta:
        """Build from a `LatentDataset.table` row dict (columns per the store contract)."""
        extra_raw = row.get("extra")
        extra: dict[str, Any] = {}
        if isinstance(extra_raw, str) and extra_raw.strip():
            try:
                parsed = json.loads(extra_raw)
                extra = parsed if isinstance(parsed, dict) else {}
            except json.JSONDecodeError:
                extra = {}
        elif isinstance(extra_raw, Mapping):
            extra = dict(extra_raw)
        sub = row.get("subreddit", extra.get("subreddit"))
        score = row.get("score")
        return cls(
            index=index,
            captions=tuple(c for c in (row.get("captions") or ()) if c and c.strip()),
            tags=tuple(t for t in (row.get("tags") or ()) if t and t.strip()),
            score=None if score is None else int(score),
            source=row.get("source"),
            watermark=row.get("watermark"),
            subreddit=str(sub) if sub else None,
            n_tokens=n_tokens,
            extra=extra,
        )


def _key128(run_seed: int, epoch: int, index: int, domain: bytes) -> int:
    digest = hashlib.blake2b(
        struct.pack("<qqq", run_seed, epoch, index), digest_size=16, person=domain[:16].ljust(16, b"\0")
    ).digest()
    return int.from_bytes(digest, "little")


def prompt_rng(run_seed: int, epoch: int, index: int, domain: bytes = b"prompt") -> np.random.Generator:
    """Counter-based generator for one key: Philox keyed by a 128-bit hash of the key tuple.

    Philox is a block cipher over a counter, so distinct keys give independent streams
    without any sequential state; hashing the tuple lets seeds be any 64-bit value.
    """
    return np.random.Generator(np.random.Philox(key=_key128(run_seed, epoch, index, domain)))


_MASK64 = (1 << 64) - 1
_scratch = threading.local()


def _rekeyed_rng(run_seed: int, epoch: int, index: int) -> np.random.Generator:
    """Same stream as `prompt_rng(...)`, from a per-thread Philox whose state is overwritten.

    Constructing a Philox costs ~60 µs (numpy also pulls OS entropy it then discards);
    setting the key and counter of an existing one costs ~9 µs. The returned generator is
    valid only until the next call in the same thread, which `synthesize` guarantees.
    """
    bitgen = getattr(_scratch, "philox", None)
    if bitgen is None:
        bitgen = _scratch.philox = np.random.Philox(key=0)
        _scratch.zeros = np.zeros(4, dtype=np.uint64)
    k = _key128(run_seed, epoch, index, b"prompt")
    z = _scratch.zeros
    bitgen.state = {
        "bit_generator": "Philox",
        "state": {"counter": z, "key": np.array([k & _MASK64, k >> 64], dtype=np.uint64)},
        "buffer": z,
        "buffer_pos": 4,
        "has_uint32": 0,
        "uinteger": 0,
    }
    return np.random.Generator(bitgen)


# CLIP's pre-tokenisation pattern (contractions, letter runs, single digits, punctuation
# runs). Counting its matches is a cheap lower-bound estimate of the BPE token count.
_PRETOKEN_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")


def estimate_tokens(text: str) -> int:
    """Cheap CLIP token-count estimate of one text, when no per-row estimate is given.

    The training loader always passes the row's table-wide estimate (`row_token_estimates`)
    instead, so tag counts and chunk buckets agree; this is for standalone use.
    """
    return len(_PRETOKEN_RE.findall(text.lower()))


def expected_quality_tokens(cfg: PromptConfig) -> float:
    """Mean CLIP tokens the quality element adds to a prompt (for chunk-count estimates)."""
    if cfg.quality == "score_tags":
        w = np.asarray(cfg.score_tag_count_weights, dtype=float)
        mean_count = float((w * np.arange(1, len(w) + 1)).sum() / w.sum())
        return cfg.score_tag_prob * mean_count * _SCORE_TAG_TOKENS
    if cfg.quality == "quality_words":
        return cfg.quality_word_prob * _QUALITY_WORD_TOKENS
    return 0.0


def metadata_tags(meta: SampleMeta, cfg: PromptConfig) -> list[str]:
    """The image's tags plus the tags bigASP's build step appended from metadata, deduplicated."""
    tags = list(dict.fromkeys(t.strip() for t in meta.tags))
    if cfg.extra_tags:
        extra: list[str] = []
        if meta.subreddit:
            extra += [meta.subreddit, "reddit"]
        if meta.watermark:
            extra.append("watermark")
        if meta.source and meta.source.strip():
            src = meta.source.strip()
            if cfg.extra_sources is None or src in cfg.extra_sources:
                extra.append(src)
        seen = set(tags)
        for t in extra:
            if t not in seen:
                tags.append(t)
                seen.add(t)
    return tags


class _Draws:
    """Uniform draws from one keyed generator, fetched in blocks (numpy calls cost ~µs each)."""

    __slots__ = ("_buf", "_i", "rng")

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self._buf: list[float] = rng.random(16).tolist()
        self._i = 0

    def u(self) -> float:
        if self._i == len(self._buf):
            self._buf = self.rng.random(16).tolist()
            self._i = 0
        x = self._buf[self._i]
        self._i += 1
        return x

    def many(self, n: int) -> list[float]:
        return self.rng.random(n).tolist() if n > 0 else []

    def index(self, n: int) -> int:
        return min(int(self.u() * n), n - 1)

    def categorical(self, weights: list[float]) -> int:
        x = self.u() * sum(weights)
        acc = 0.0
        for i, w in enumerate(weights):
            acc += w
            if x < acc:
                return i
        return len(weights) - 1

    def normal(self, mean: float, std: float) -> float:
        return _STD_NORMAL.inv_cdf(min(max(self.u(), 1e-12), 1 - 1e-12)) * std + mean

    def permutation(self, n: int) -> list[int]:
        return self.rng.permutation(n).tolist() if n > 1 else list(range(n))


_STD_NORMAL = NormalDist()


def _choose_tags(tags: list[str], n_tags: int, cfg: PromptConfig, d: _Draws) -> list[str]:
    """Priority tags always, then a uniform sample of the rest, in shuffled order."""
    priority = set(cfg.priority_tags)
    keep = [t for t in tags if t in priority]
    rest = [t for t in tags if t not in priority]
    n = min(max(n_tags, len(keep)), len(tags))
    picked = [rest[i] for i in d.permutation(len(rest))[: n - len(keep)]]
    chosen = keep + picked
    return [chosen[i] for i in d.permutation(len(chosen))]


def _tag_count(meta: SampleMeta, cfg: PromptConfig, d: _Draws) -> int:
    """bigASP v2 matched the tag count to the caption's length; bigASP v1 drew it from
    Normal(32, 19.8). An image without a caption has no length to match (its token estimate
    describes the tag prompt itself), so it always takes the Normal draw."""
    match = d.u() < cfg.tag_count_match_prob
    normal = d.normal(cfg.tag_count_mean, cfg.tag_count_std)
    if match and meta.captions:
        n_tokens = meta.n_tokens
        if n_tokens is None:
            n_tokens = round(sum(estimate_tokens(c) for c in meta.captions) / len(meta.captions))
        n = int(n_tokens / cfg.tokens_per_tag)
    else:  # Normal draw (always for tag-only images)
        n = int(normal)
    return max(cfg.min_tags, n)


def _render_tags(
    tags: list[str], cfg: PromptConfig, d: _Draws, aliases: AliasTable | None, protected: set[str]
) -> list[str]:
    style = d.categorical(cfg.underscore_weights)  # 0 keep, 1 spaces, 2 mixed
    u = d.many(3 * len(tags))
    out = []
    for k, tag in enumerate(tags):
        if aliases is not None and tag not in protected and u[3 * k] < cfg.alias_prob:
            options = aliases.alternatives(tag)
            if options:
                tag = options[min(int(u[3 * k + 2] * len(options)), len(options) - 1)]
        if style == 1 or (style == 2 and u[3 * k + 1] < cfg.mixed_space_prob):
            tag = tag.replace("_", " ")
        out.append(tag)
    return out


def _join_tags(parts: list[str], cfg: PromptConfig, d: _Draws) -> str:
    if not parts:
        return ""
    u = d.many(len(parts) - 1)
    pieces = [parts[0]]
    for part, x in zip(parts[1:], u, strict=True):
        pieces.append(", " if x < cfg.separator_space_prob else ",")
        pieces.append(part)
    return "".join(pieces)


def _score_tags(score: int, cfg: PromptConfig, d: _Draws) -> str:
    """bigASP v2: 1-3 of {score_1_up .. score_N_up, score_N}, each maybe spaced, prepended one by one."""
    candidates = [f"score_{k}_up" for k in range(1, score + 1)] + [f"score_{score}"]
    count = d.categorical(cfg.score_tag_count_weights) + 1
    picked = [candidates[i] for i in d.permutation(len(candidates))[: min(count, len(candidates))]]
    text = ""
    for tag in picked:
        if d.u() < cfg.score_tag_space_prob:
            tag = tag.replace("_", " ")
        sep = cfg.score_tag_separators[d.index(len(cfg.score_tag_separators))]
        text = tag + sep + text
    return text


def synthesize(
    meta: SampleMeta,
    cfg: PromptConfig,
    key: tuple[int, int, int],
    aliases: AliasTable | None = None,
) -> str:
    """The training prompt of `meta` under `key = (run_seed, epoch, sample_index)`.

    Pure: no state besides the arguments. Draw order is fixed (UCG, source, quality, body)
    so each probability is exactly the configured one, independent of the others.
    """
    d = _Draws(_rekeyed_rng(*key))
    if d.u() < cfg.ucg_rate:
        return ""
    tags = metadata_tags(meta, cfg)
    use_tags = d.u() < cfg.tag_prob
    if not meta.captions:
        use_tags = True
    elif not tags:
        use_tags = False

    want_quality = d.u()
    has_score = meta.score is not None and 0 <= meta.score <= 9
    quality_word = None
    if has_score and cfg.quality == "quality_words" and want_quality < cfg.quality_word_prob:
        quality_word = cfg.quality_words[meta.score]

    if use_tags:
        chosen = _choose_tags(tags, _tag_count(meta, cfg, d), cfg, d)
        rendered = _render_tags(chosen, cfg, d, aliases, set(cfg.priority_tags))
        if quality_word is not None:
            rendered.insert(d.index(len(rendered) + 1), quality_word)
        body = _join_tags(rendered, cfg, d)
    else:
        body = meta.captions[d.index(len(meta.captions))] if meta.captions else ""
        if quality_word is not None:
            if not body:
                body = quality_word
            elif d.u() < 0.5:
                body = f"{quality_word}, {body}"
            else:
                body = (
                    f"{body} {quality_word}" if body.rstrip()[-1:] in ".!?,;:" else f"{body}, {quality_word}"
                )

    if has_score and cfg.quality == "score_tags" and want_quality < cfg.score_tag_prob:
        prefix = _score_tags(meta.score, cfg, d)
        body = prefix + body if body else prefix.rstrip(" ,")
    return body.strip()


__all__ = [
    "DEFAULT_QUALITY_WORDS",
    "EVAL_EPOCH",
    "PromptConfig",
    "SampleMeta",
    "estimate_tokens",
    "expected_quality_tokens",
    "metadata_tags",
    "prompt_rng",
    "synthesize",
]
