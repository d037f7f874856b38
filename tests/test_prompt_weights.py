"""Weight syntax parsing (ComfyUI and A1111 cases from the reference note) and weight application."""

from __future__ import annotations

import logging

import pytest
import torch

from bigasp.sample.prompts import (
    BREAK,
    apply_weights_a1111,
    apply_weights_comfy,
    encode_weighted,
    parse_a1111,
    parse_comfy,
    weighted_tokens,
)
from bigasp.text import BOS, EOS, tokenize


def approx(pairs):
    return [(s, pytest.approx(w)) for s, w in pairs]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("(x)", [("x", 1.1)]),
        ("((x))", [("x", 1.21)]),
        ("(x:1.5)", [("x", 1.5)]),
        ("((x:1.5))", [("x", 1.5)]),  # explicit inner weight replaces
        ("((x):1.5)", [("x", 1.65)]),
        ("((mixed (deep:1.5) weights))", [("mixed ", 1.21), ("deep", 1.5), (" weights", 1.21)]),
        ("[x]", [("[x]", 1.0)]),  # literal in ComfyUI
        ("(a:b)", [("a:b", 1.1)]),  # non-numeric suffix stays text
        ("a (b", [("a ", 1.0), ("(b", 1.0)]),  # unclosed: rest literal
        ("photo \\(medium\\), 1girl", [("photo (medium), 1girl", 1.0)]),
        (
            "score_7_up, (photo \\(medium\\):1.2), x",
            [("score_7_up, ", 1.0), ("photo (medium)", 1.2), (", x", 1.0)],
        ),
        ("a BREAK b", [("a BREAK b", 1.0)]),
    ],
)
def test_comfy_parsing(text, expected):
    assert parse_comfy(text) == approx(expected)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("(x)", [("x", 1.1)]),
        ("((x:1.3))", [("x", 1.43)]),  # composes with outer brackets
        ("((a (b:1.5)))", [("a ", 1.21), ("b", 1.815)]),
        ("[x]", [("x", 1 / 1.1)]),
        ("a (b", [("a ", 1.0), ("b", 1.1)]),  # unclosed: weights to the end
        ("photo \\(medium\\)", [("photo (medium)", 1.0)]),
        ("(a) (b)", [("a", 1.1), (" ", 1.0), ("b", 1.1)]),
        ("x:1.5)", [("x:1.5)", 1.0)]),  # no open bracket: literal
    ],
)
def test_a1111_parsing(text, expected):
    assert parse_a1111(text) == approx(expected)


def test_a1111_break_marker():
    assert parse_a1111("a BREAK b") == [("a", 1.0), BREAK, ("b", 1.0)]


def test_weighted_tokens_layout():
    wt = weighted_tokens(["a (cat:1.5) dog"], "comfy")
    ids = tokenize(["a "])[0] + tokenize(["cat"])[0] + tokenize([" dog"])[0]
    te1 = wt.tokens.te1[0, 0].tolist()
    assert te1[: len(ids) + 2] == [BOS, *ids, EOS]
    w = wt.weights[0, 0].tolist()
    assert w[0] == 1.0 and w[1 + len(tokenize(["a "])[0])] == pytest.approx(1.5)
    assert sum(v != 1.0 for v in w) == len(tokenize(["cat"])[0])
    assert wt.tokens.te2[0, 0, len(ids) + 2 :].eq(0).all()  # CLIP-G pads with 0


def test_long_prompt_chunks_and_warns(caplog):
    prompt = ", ".join(["cat"] * 130)  # 259 tokens -> 4 chunks, past the trained 225
    n = len(tokenize([prompt])[0])
    with caplog.at_level(logging.WARNING):
        wt = weighted_tokens([prompt, "dog"])
    assert wt.tokens.te1.shape == (2, -(-n // 75), 77)
    assert "225" in caplog.text
    # the short prompt is padded with empty chunks [BOS, EOS, pad...]
    assert wt.tokens.te1[1, 1, :2].tolist() == [BOS, EOS]


def test_a1111_break_starts_new_chunk():
    wt = weighted_tokens(["a cat BREAK a dog"], "a1111")
    assert wt.tokens.te1.shape[1] == 2
    assert wt.tokens.te1[0, 1, 1 : 1 + len(tokenize(["a dog"])[0])].tolist() == tokenize(["a dog"])[0]


def test_apply_weights_comfy_formula():
    z = torch.arange(2 * 154 * 3, dtype=torch.float32).reshape(2, 154, 3)
    z_empty = torch.randn(1, 77, 3)
    w = torch.ones(2, 154)
    w[0, 5], w[1, 100] = 1.5, 0.5
    out = apply_weights_comfy(z, z_empty, w)
    assert torch.equal(out[0, :5], z[0, :5])
    torch.testing.assert_close(out[0, 5], (z[0, 5] - z_empty[0, 5]) * 1.5 + z_empty[0, 5])
    torch.testing.assert_close(out[1, 100], (z[1, 100] - z_empty[0, 23]) * 0.5 + z_empty[0, 23])


def test_apply_weights_a1111_restores_mean_per_chunk_and_encoder():
    z = torch.rand(1, 154, 5) + 0.5
    w = torch.ones(1, 154)
    w[0, 3], w[0, 80] = 1.3, 0.7
    out = apply_weights_a1111(z, w, split=2)
    for k in range(2):
        for sl in (slice(0, 2), slice(2, 5)):
            torch.testing.assert_close(
                out[0, 77 * k : 77 * (k + 1), sl].mean(), z[0, 77 * k : 77 * (k + 1), sl].mean()
            )
    ratio = out[0, 3] / z[0, 3]
    other = out[0, 4] / z[0, 4]
    torch.testing.assert_close(ratio, other * 1.3)


def test_encode_weighted_against_plain_encoding(tiny_model):
    from bigasp.models.conditioning import encode_prompts

    te1, te2 = tiny_model.text_encoder, tiny_model.text_encoder_2
    with torch.no_grad():
        plain = encode_prompts(te1, te2, ["a photo of a cat"])
    same = encode_weighted(te1, te2, ["a photo of a cat"], "comfy")
    torch.testing.assert_close(same.embeds, plain.embeds)
    escaped = encode_weighted(te1, te2, ["photo \\(medium\\)"], "comfy")
    with torch.no_grad():
        literal = encode_prompts(te1, te2, ["photo (medium)"])
    torch.testing.assert_close(escaped.embeds, literal.embeds)
    weighted = encode_weighted(te1, te2, ["a (photo:1.0) of a (cat:1.4)"], "comfy")
    unweighted = encode_weighted(te1, te2, ["a (photo:1.0) of a (cat:1.0)"], "comfy")
    torch.testing.assert_close(weighted.pooled, unweighted.pooled)  # pooled is never weighted
    n_plain = 1 + len(tokenize(["a "])[0] + tokenize(["photo"])[0] + tokenize([" of a "])[0])
    torch.testing.assert_close(weighted.embeds[0, :n_plain], unweighted.embeds[0, :n_plain])
    assert not torch.allclose(weighted.embeds[0, n_plain], unweighted.embeds[0, n_plain])


def test_encode_weighted_a1111_mode(tiny_model):
    te1, te2 = tiny_model.text_encoder, tiny_model.text_encoder_2
    comfy = encode_weighted(te1, te2, ["a (cat:1.4)"], "comfy")
    a1111 = encode_weighted(te1, te2, ["a (cat:1.4)"], "a1111")
    plain = encode_weighted(te1, te2, ["a cat"], "none")
    torch.testing.assert_close(a1111.pooled, plain.pooled)
    assert not torch.allclose(a1111.embeds, comfy.embeds)
    split = te1.config.hidden_size
    for part in (slice(0, split), slice(split, None)):  # mean restored per encoder
        torch.testing.assert_close(a1111.embeds[..., part].mean(), plain.embeds[..., part].mean())


def test_comfy_chunking_moves_short_segments_whole():
    from bigasp.sample.prompts import prompt_chunks

    head = "cat, " * 37
    n_head = len(tokenize([head])[0])
    assert n_head == 74
    text = head + "(big cat:1.2)"
    assert [len(c[0]) for c in prompt_chunks(text, "comfy", "bigasp")] == [75, 1]
    comfy = prompt_chunks(text, "comfy", "comfy")
    assert [len(c[0]) for c in comfy] == [74, 2]
    assert comfy[1][1] == [pytest.approx(1.2)] * 2
    long_group = head + "(" + "dog " * 10 + ":1.2)"  # >= 8 tokens: split to fill the chunk
    assert [len(c[0]) for c in prompt_chunks(long_group, "comfy", "comfy")] == [75, 9]
    plain = "dog, " * 60  # no weights: both rules give the same chunks
    assert prompt_chunks(plain, "comfy", "comfy") == prompt_chunks(plain, "comfy", "bigasp")
