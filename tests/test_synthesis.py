"""Prompt synthesis: every configured probability on >= 10k keyed draws, determinism, rules.

Keys are fixed, so these tests are deterministic; tolerances are 4.5 binomial standard
errors, tight enough that a 10% UCG instead of bigASP v2's 5%, or a swapped probability,
fails them.
"""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest

from bigasp.config import validate
from bigasp.errors import ConfigError
from bigasp.text.aliases import AliasTable
from bigasp.text.synthesis import (
    PromptConfig,
    SampleMeta,
    estimate_tokens,
    expected_quality_tokens,
    metadata_tags,
    prompt_rng,
    synthesize,
)

N = 10_000


def assert_rate(k: int, n: int, p: float, z: float = 4.5) -> None:
    se = math.sqrt(max(p * (1 - p), 1e-12) / n)
    assert abs(k / n - p) <= z * se + 1e-12, f"rate {k}/{n} = {k / n:.4f}, expected {p:.4f} ± {z * se:.4f}"


def phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


SCORE_TAG = re.compile(r"(score(?:_\d+(?:_up)?| \d+(?: up)?))(, |,| )")


def split_score_prefix(prompt: str) -> tuple[list[tuple[str, str]], str]:
    parts = []
    pos = 0
    while m := SCORE_TAG.match(prompt, pos):
        parts.append((m.group(1), m.group(2)))
        pos = m.end()
    return parts, prompt[pos:]


CAPTIONS = ("CAPA a red dog runs in the sun.", "CAPB two cats sleep.")


@pytest.fixture(scope="module")
def default_draws():
    """Default config, score-9 image with two captions: UCG, source, caption choice, score tags."""
    cfg = PromptConfig()
    meta = SampleMeta(index=0, captions=CAPTIONS, tags=tuple(f"t_{k}" for k in range(30)), score=9)
    return [synthesize(meta, cfg, (1234, 0, i)) for i in range(12_500)]  # >= 10k caption prompts


def test_ucg_rate_is_the_configured_one(default_draws):
    assert_rate(sum(p == "" for p in default_draws), len(default_draws), 0.05)  # bigASP v2's data.py
    meta = SampleMeta(index=0, captions=CAPTIONS, score=5)
    cfg = PromptConfig(ucg_rate=0.3)
    assert_rate(sum(synthesize(meta, cfg, (7, 3, i)) == "" for i in range(N)), N, 0.3)


def test_tags_versus_caption_and_caption_choice(default_draws):
    bodies = [split_score_prefix(p)[1] for p in default_draws if p]
    n = len(bodies)
    captions = [b for b in bodies if b.startswith("CAP")]
    assert_rate(n - len(captions), n, 0.1)  # tag prompts
    assert_rate(sum(b.startswith("CAPA") for b in captions), len(captions), 0.5)
    assert all(b in CAPTIONS for b in captions)


def test_score_tags_v2(default_draws):
    prompts = [p for p in default_draws if p]
    parsed = [split_score_prefix(p)[0] for p in prompts]
    with_tags = [t for t in parsed if t]
    assert_rate(len(with_tags), len(prompts), 0.9)
    counts = np.bincount([len(t) for t in with_tags], minlength=4)
    assert counts[0] == 0 and len(counts) == 4
    for c, p in ((1, 3 / 6), (2, 2 / 6), (3, 1 / 6)):
        assert_rate(int(counts[c]), len(with_tags), p)
    tags = [tag for t in with_tags for tag, _ in t]
    seps = [sep for t in with_tags for _, sep in t]
    assert_rate(sum(" " in t for t in tags), len(tags), 0.2)
    for sep in (", ", " ", ","):
        assert_rate(seps.count(sep), len(seps), 1 / 3)
    allowed = {f"score_{k}_up" for k in range(1, 10)} | {"score_9"}
    for t in with_tags:
        names = [tag.replace(" ", "_") for tag, _ in t]
        assert set(names) <= allowed and len(set(names)) == len(names)


def test_score_tags_cover_only_valid_scores():
    cfg = PromptConfig(ucg_rate=0.0, score_tag_prob=1.0)
    for score in (0, 1, 4):
        meta = SampleMeta(index=0, captions=("CAPA x.",), score=score)
        seen = set()
        for i in range(300):
            tags, _ = split_score_prefix(synthesize(meta, cfg, (1, 0, i)))
            seen |= {t.replace(" ", "_") for t, _ in tags}
        assert seen == {f"score_{k}_up" for k in range(1, score + 1)} | {f"score_{score}"}
    unknown = SampleMeta(index=0, captions=("CAPA x.",), score=None)
    assert all(synthesize(unknown, cfg, (1, 0, i)) == "CAPA x." for i in range(50))


TAGS = tuple(f"tag_{k}_x" for k in range(60))


def _tag_alias_table() -> AliasTable:
    lines = [
        f'{{"antecedent_name": "alias_{k}_x", "consequent_name": "tag_{k}_x", "status": "active"}}'
        for k in range(60)
    ]
    lines.append('{"antecedent_name": "wm", "consequent_name": "watermark", "status": "active"}')
    return AliasTable.parse(lines)


@pytest.fixture(scope="module")
def tag_draws():
    cfg = PromptConfig(ucg_rate=0.0, tag_prob=1.0, score_tag_prob=0.0, tag_count_match_prob=0.5)
    meta = SampleMeta(index=0, captions=("CAPA x.",), tags=TAGS, watermark=True, n_tokens=50, score=5)
    aliases = _tag_alias_table()
    return [synthesize(meta, cfg, (99, 1, i), aliases) for i in range(N)]


def _split_tags(p: str) -> tuple[list[str], list[str]]:
    return re.split(r", |,", p), re.findall(r", |,", p)


def test_tag_count_match_or_normal(tag_draws):
    counts = np.array([len(_split_tags(p)[0]) for p in tag_draws])
    # match: int(50 / 2.5) = 20; normal: max(5, int(N(32, 19.8))), capped at the 61 available tags
    p20 = 0.5 + 0.5 * (phi((21 - 32) / 19.8) - phi((20 - 32) / 19.8))
    assert_rate(int((counts == 20).sum()), N, p20)
    assert_rate(int((counts == 5).sum()), N, 0.5 * phi((6 - 32) / 19.8))
    assert_rate(int((counts == 61).sum()), N, 0.5 * (1 - phi((61 - 32) / 19.8)))
    assert counts.min() == 5 and counts.max() == 61


def test_normal_tag_count_mean():
    cfg = PromptConfig(ucg_rate=0.0, tag_prob=1.0, quality="none", tag_count_match_prob=0.0)
    meta = SampleMeta(index=0, tags=tuple(f"t{k}" for k in range(100)))
    counts = np.array([len(synthesize(meta, cfg, (5, 0, i)).split(",")) for i in range(N)])
    # E[min(100, max(5, trunc(X)))], X ~ N(32, 19.8), on a fine grid
    x = np.linspace(32 - 8 * 19.8, 32 + 8 * 19.8, 200_001)
    w = np.exp(-0.5 * ((x - 32) / 19.8) ** 2)
    y = np.minimum(100, np.maximum(5, np.trunc(x)))
    expect = float((y * w).sum() / w.sum())
    sd = float(np.sqrt(((y - expect) ** 2 * w).sum() / w.sum()))
    assert abs(counts.mean() - expect) < 4.5 * sd / math.sqrt(N)


def test_priority_tag_always_kept_and_never_aliased(tag_draws):
    for p in tag_draws:
        tags, _ = _split_tags(p)
        assert tags.count("watermark") == 1
        assert "wm" not in tags


def test_alias_rate(tag_draws):
    tags = [t for p in tag_draws for t in _split_tags(p)[0] if t != "watermark"]
    assert_rate(sum(t.startswith("alias") for t in tags), len(tags), 0.2)


def test_separator_rate(tag_draws):
    seps = [s for p in tag_draws for s in _split_tags(p)[1]]
    assert_rate(seps.count(", "), len(seps), 0.8)


def test_underscore_styles(tag_draws):
    kept = spaced = 0
    e_all_spaced = 0.0
    for p in tag_draws:
        tags = [t for t in _split_tags(p)[0] if t != "watermark"]
        kept += all("_" in t for t in tags)
        spaced += all("_" not in t for t in tags)
        e_all_spaced += (1 + 0.8 ** len(tags) + 0.0) / 3
    assert_rate(kept, N, 1 / 3)
    assert abs(spaced - e_all_spaced) <= 4.5 * math.sqrt(N * (1 / 3) * (2 / 3))
    cfg = PromptConfig(ucg_rate=0.0, tag_prob=1.0, quality="none", underscore_weights=[0, 0, 1], min_tags=20)
    meta = SampleMeta(index=0, tags=TAGS[:20])
    tags = [t for i in range(600) for t in _split_tags(synthesize(meta, cfg, (3, 0, i)))[0]]
    assert len(tags) >= N
    assert_rate(sum("_" not in t for t in tags), len(tags), 0.8)


def test_quality_words_v25():
    cfg = PromptConfig(ucg_rate=0.0, quality="quality_words")
    words = cfg.quality_words
    first = last = none = 0
    n = 11_200  # >= 10k prompts with a quality word
    for i in range(n):
        score = i % 10
        meta = SampleMeta(index=i, captions=("CAPA a dog.",), score=score)
        p = synthesize(meta, cfg, (11, 0, i))
        assert "score" not in p
        if p == "CAPA a dog.":
            none += 1
        elif p == f"{words[score]}, CAPA a dog.":
            first += 1
        else:
            assert p == f"CAPA a dog. {words[score]}", p
            last += 1
    assert_rate(none, n, 0.1)
    assert first + last >= N
    assert_rate(first, first + last, 0.5)
    assert words[0] == "worst quality" and words[9] == "masterpiece quality"


def test_quality_word_in_tag_prompt_takes_a_random_position():
    cfg = PromptConfig(ucg_rate=0.0, tag_prob=1.0, quality="quality_words", quality_word_prob=1.0, min_tags=4)
    meta = SampleMeta(index=0, tags=("a", "b", "c", "d"), score=6)
    positions = [_split_tags(synthesize(meta, cfg, (2, 0, i)))[0].index("high quality") for i in range(N)]
    counts = np.bincount(positions, minlength=5)
    for c in counts:
        assert_rate(int(c), len(positions), 0.2)


def test_determinism_by_key_and_no_global_rng():
    cfg = PromptConfig(tag_prob=0.5)
    meta = SampleMeta(index=0, captions=CAPTIONS, tags=TAGS, score=7, watermark=True)
    state_py, state_np = random.getstate(), np.random.get_state()
    a = [synthesize(meta, cfg, (42, e, i)) for e in range(3) for i in range(200)]
    assert random.getstate() == state_py
    assert all(x == y for x, y in zip(state_np[1], np.random.get_state()[1], strict=True))
    random.seed(0)
    np.random.seed(1)
    b = [synthesize(meta, cfg, (42, e, i)) for e in range(3) for i in range(200)]
    assert a == b
    c = [synthesize(meta, cfg, (43, e, i)) for e in range(3) for i in range(200)]
    assert sum(x != y for x, y in zip(a, c, strict=True)) > 300  # the seed matters
    assert a[:200] != a[200:400]  # so does the epoch
    assert prompt_rng(1, 2, 3).random() == prompt_rng(1, 2, 3).random()
    assert prompt_rng(1, 2, 3).random() != prompt_rng(1, 2, 4).random()


def test_extra_tags_from_metadata():
    cfg = PromptConfig()
    meta = SampleMeta(index=0, tags=("a", "watermark"), source="flickr", watermark=True, subreddit="r/pics")
    assert metadata_tags(meta, cfg) == ["a", "watermark", "r/pics", "reddit", "flickr"]
    only = PromptConfig(extra_sources=["unsplash"])
    assert metadata_tags(meta, only) == ["a", "watermark", "r/pics", "reddit"]
    assert metadata_tags(meta, PromptConfig(extra_tags=False)) == ["a", "watermark"]
    row = {
        "captions": ["x"],
        "tags": ["b"],
        "score": 3,
        "source": None,
        "watermark": True,
        "extra": '{"subreddit": "r/earthporn"}',
    }
    assert metadata_tags(SampleMeta.from_row(5, row), cfg) == ["b", "r/earthporn", "reddit", "watermark"]


def test_no_caption_no_tags_and_estimates():
    cfg = PromptConfig(ucg_rate=0.0, score_tag_prob=1.0, score_tag_count_weights=[1.0])
    p = synthesize(SampleMeta(index=0, score=3), cfg, (0, 0, 0))
    assert re.fullmatch(r"score[ _]3(?:[ _]up)?|score[ _][12][ _]up", p), p
    assert estimate_tokens("A photo of a dog, running. It's sunny!") == 12
    assert expected_quality_tokens(PromptConfig()) == pytest.approx(0.9 * (10 / 6) * 5.5)
    assert expected_quality_tokens(PromptConfig(quality="none")) == 0


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="ucg_rate"):
        validate(PromptConfig, {"ucg_rate": 1.5})
    with pytest.raises(ConfigError, match="quality_words"):
        validate(PromptConfig, {"quality_words": ["a"]})
    with pytest.raises(ConfigError, match="underscore_weights"):
        validate(PromptConfig, {"underscore_weights": [1, 1]})


def test_fast_rekeyed_generator_gives_the_keyed_stream():
    from bigasp.text.synthesis import _rekeyed_rng

    for key in [(1, 2, 3), (2**62, -1, 10**12), (0, 0, 0)]:
        assert np.array_equal(prompt_rng(*key).random(40), _rekeyed_rng(*key).random(40))
        assert np.array_equal(prompt_rng(*key).permutation(50), _rekeyed_rng(*key).permutation(50))
