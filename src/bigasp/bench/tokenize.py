"""`bigasp bench tokenize`: CLIP tokenisation + 75-token chunking of realistic prompts.

Prompts are built from a fixed word/tag list by a seeded generator: a mix of booru tag lists
and JoyCaption-style sentences, 40–200 tokens long like bigASP's captions, so the byte-level
BPE sees realistic word lengths and punctuation (an all-"a a a" prompt would flatter it).
"""

from __future__ import annotations

import random
import time
from typing import Any

from bigasp.bench.common import BenchResult, machine_info, summarize

_TAG_TEXT = (
    "1girl 1boy solo looking_at_viewer smile long_hair short_hair blue_eyes brown_hair black_hair blonde_hair "
    "outdoors indoors sitting standing holding jacket dress shirt skirt hat glasses sky cloud tree flower "
    "night day city street building window water beach mountain forest snow rain reflection depth_of_field "
    "bokeh close-up full_body upper_body from_side from_above portrait landscape cinematic_lighting "
    "photorealistic film_grain watercolor_(medium) oil_painting_(medium) sketch monochrome greyscale"
)
_WORD_TEXT = (
    "a photograph of woman man young old standing sitting in front near the with and her his wearing "
    "red blue green white black dark light soft warm cold golden evening morning sunlight shadows background "
    "foreground detailed texture wooden table chair lamp window curtains walls painted brick concrete "
    "street market crowd people car bicycle dog cat bird sky clouds mountains river lake trees leaves "
    "scene composition centered frame camera lens shallow focus blurred sharp highly quality image "
    "expression smiling looking away toward viewer holding cup book phone umbrella bag hair long short"
)
_TAGS = _TAG_TEXT.split()
_WORDS = _WORD_TEXT.split()
_PUNCT = (",", ",", ",", ".", "")


def realistic_prompts(n: int, *, seed: int = 0, min_words: int = 32, max_words: int = 125) -> list[str]:
    """`n` prompts, deterministic for `seed` (≈1.3 CLIP tokens per word → ~40–200 tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        n_words = rng.randint(min_words, max_words)
        if i % 3 == 0:  # tag list, as bigASP's tag-string prompts
            tags = [rng.choice(_TAGS).replace("_", " ") for _ in range(max(1, int(n_words / 1.5)))]
            out.append(", ".join(tags))
        else:  # caption sentences
            words = []
            for _ in range(n_words):
                words.append(
                    rng.choice(_WORDS) + rng.choice(_PUNCT) if rng.random() < 0.15 else rng.choice(_WORDS)
                )
            if i % 3 == 2:
                words.append(f"score_{rng.randint(1, 9)}_up")
            out.append(" ".join(words).capitalize())
    return out


def run_tokenize_bench(*, n_prompts: int, batch: int, seed: int, repeats: int, command: str) -> BenchResult:
    import torch

    from bigasp.text import chunk_batch, clip_tokenizer, tokenize

    prompts = realistic_prompts(n_prompts, seed=seed)
    clip_tokenizer()  # load once outside the timed region (a loader worker loads it once too)
    batches = [prompts[i : i + batch] for i in range(0, n_prompts, batch)]

    lengths: list[int] = []

    def one_pass() -> None:
        lengths.clear()
        for b in batches:
            ids = tokenize(b)
            lengths.extend(len(x) for x in ids)
            chunk_batch(ids, max_chunks=3, warn=False)

    t0 = time.perf_counter()
    one_pass()
    first_s = time.perf_counter() - t0
    seconds = [first_s]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        one_pass()
        seconds.append(time.perf_counter() - t0)
    stats = summarize(seconds)
    sorted_len = sorted(lengths)
    metrics: dict[str, Any] = {
        "ms_per_1000": stats["median_s"] / n_prompts * 1000 * 1000,
        "prompts_per_s": n_prompts / stats["median_s"],
        "tokens_min": sorted_len[0],
        "tokens_median": sorted_len[len(sorted_len) // 2],
        "tokens_max": sorted_len[-1],
        "truncated_fraction": sum(1 for x in lengths if x > 225) / len(lengths),
        **{f"pass_{k}": v for k, v in stats.items()},
    }
    return BenchResult(
        bench="tokenize",
        config={"n_prompts": n_prompts, "batch": batch, "seed": seed, "repeats": repeats},
        metrics=metrics,
        headline=[("ms_per_1000", "ms/1000 prompts"), ("prompts_per_s", "prompts/s")],
        command=command,
        machine=machine_info(torch.device("cpu")),
    )
