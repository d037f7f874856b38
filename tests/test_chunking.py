"""75-token chunking exactly as bigASP trained: [BOS] + <=75 tokens + [EOS] + pad = 77 per chunk.

Expected rows are written out by hand here (not via `chunk_ids`), so the tests check the
layout itself rather than the implementation against itself.
"""

from __future__ import annotations

import logging

import pytest
import torch

from bigasp.text import BOS, EOS, chunk_batch, chunk_ids, n_chunks_for, tokenize


def row(content: list[int], pad: int) -> list[int]:
    out = [BOS, *content, EOS]
    return out + [pad] * (77 - len(out))


def toks(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def test_long_prompt_splits_every_75_tokens():
    ids = toks(160)
    c = chunk_batch([ids], max_chunks=None)
    assert c.te1.shape == c.te2.shape == (1, 3, 77)
    assert c.te1.dtype == torch.int64
    assert c.te1[0, 0].tolist() == row(ids[:75], EOS)
    assert c.te1[0, 1].tolist() == row(ids[75:150], EOS)
    assert c.te1[0, 2].tolist() == row(ids[150:], EOS)
    assert c.te2[0, 2].tolist() == row(ids[150:], 0)
    assert c.n_tokens == [160] and c.n_truncated == 0


def test_exactly_75_tokens_is_one_full_chunk():
    ids = toks(75)
    c = chunk_batch([ids])
    assert c.n_chunks == 1
    assert c.te1[0, 0].tolist() == [BOS, *ids, EOS]
    assert c.te2[0, 0].tolist() == [BOS, *ids, EOS]  # no room for padding


def test_76_tokens_spill_one_token_into_a_second_chunk():
    ids = toks(76)
    c = chunk_batch([ids])
    assert c.n_chunks == 2
    assert c.te1[0, 0].tolist() == [BOS, *ids[:75], EOS]
    assert c.te1[0, 1].tolist() == row([ids[75]], EOS)
    assert c.te2[0, 1].tolist() == row([ids[75]], 0)


def test_empty_prompt_is_one_chunk():
    c = chunk_batch([[]])
    assert c.n_chunks == 1
    assert c.te1[0, 0].tolist() == [BOS, EOS] + [EOS] * 75
    assert c.te2[0, 0].tolist() == [BOS, EOS] + [0] * 75


def test_batch_is_padded_to_the_longest_prompt_with_empty_chunks():
    short, long = toks(5), toks(100, start=2000)
    c = chunk_batch([short, long, []])
    assert c.te1.shape == (3, 2, 77)
    assert c.te1[0, 0].tolist() == row(short, EOS)
    assert c.te1[0, 1].tolist() == row([], EOS)
    assert c.te2[0, 1].tolist() == row([], 0)
    assert c.te1[1, 1].tolist() == row(long[75:], EOS)
    assert c.te1[2, 0].tolist() == c.te1[2, 1].tolist() == row([], EOS)
    assert c.n_tokens == [5, 100, 0]


def test_min_chunks_forces_a_chunk_count():
    c = chunk_batch([toks(3)], min_chunks=3)
    assert c.n_chunks == 3
    assert c.te2[0, 2].tolist() == row([], 0)


def test_truncation_is_counted_and_warned(caplog):
    ids_long, ids_ok = toks(300), toks(225)
    with caplog.at_level(logging.WARNING, logger="bigasp.text.chunking"):
        c = chunk_batch([ids_long, ids_ok, ids_long], max_chunks=3)
    assert c.n_chunks == 3 and c.n_truncated == 2
    assert c.n_tokens == [300, 225, 300]
    assert c.te1[0, 2].tolist() == [BOS, *ids_long[150:225], EOS]
    assert c.te1[1, 2].tolist() == [BOS, *ids_ok[150:225], EOS]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 prompt(s)" in warnings[0].getMessage() and "225" in warnings[0].getMessage()


def test_exactly_225_tokens_is_not_truncated(caplog):
    with caplog.at_level(logging.WARNING):
        c = chunk_batch([toks(225)], max_chunks=3)
    assert c.n_truncated == 0 and c.n_chunks == 3
    assert not caplog.records


def test_warn_false_still_counts(caplog):
    with caplog.at_level(logging.WARNING):
        c = chunk_batch([toks(76)], max_chunks=1, warn=False)
    assert c.n_truncated == 1 and c.n_chunks == 1
    assert not caplog.records


def test_no_limit_for_generation():
    c = chunk_batch([toks(400)], max_chunks=None)
    assert c.n_chunks == 6 and c.n_truncated == 0


def test_empty_batch():
    c = chunk_batch([])
    assert c.te1.shape == (0, 1, 77) and c.n_truncated == 0


def test_literal_end_of_text_inside_a_prompt_stays_content_for_te2():
    """CLIP turns the text '<|endoftext|>' into id 49407; TE2 padding must not start there."""
    ids = tokenize(["cat <|endoftext|> dog"])[0]
    assert ids[1] == EOS
    c = chunk_batch([ids])
    assert c.te2[0, 0].tolist() == row(ids, 0)
    assert c.te1[0, 0].tolist() == row(ids, EOS)


@pytest.mark.parametrize(("n", "chunks"), [(0, 1), (1, 1), (75, 1), (76, 2), (150, 2), (151, 3), (225, 3)])
def test_n_chunks_for(n, chunks):
    assert n_chunks_for(n) == chunks
    assert chunk_ids(toks(n), pad_id=EOS).shape == (chunks, 77)
