"""ELO tournament, derangements and bins against a literal transcription of bigASP's notebook."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy.stats import spearmanr

from bigasp.quality import elo
from bigasp.quality.keys import rng


def bigasp_do_round(paths, derangement, ratings, scores, k_factor=10):
    """TrainRanker.ipynb `do_round`, copied as written (model outputs replaced by `scores`)."""

    def expected_score(rating_a, rating_b):
        return 1 / (1 + 10 ** ((rating_b - rating_a) / 400))

    pairs = list(zip(paths, derangement, strict=True))
    scores = [1.0 if score > 0.5 else 0.0 for score in scores]
    ratings_a = [ratings[a] for a, b in pairs]
    ratings_b = [ratings[b] for a, b in pairs]
    expected_a = [
        expected_score(rating_a, rating_b) for rating_a, rating_b in zip(ratings_a, ratings_b, strict=True)
    ]
    expected_b = [
        expected_score(rating_b, rating_a) for rating_a, rating_b in zip(ratings_a, ratings_b, strict=True)
    ]
    for i, (a, b) in enumerate(pairs):
        score = scores[i]
        rating_a = ratings_a[i]
        rating_b = ratings_b[i]
        ratings[a] = rating_a + k_factor * (score - expected_a[i])
        ratings[b] = rating_b + k_factor * ((1 - score) - expected_b[i])


def test_expected_score_is_the_elo_formula():
    assert elo.expected_score(np.array(1500.0), np.array(1500.0)) == pytest.approx(0.5)
    # 400 points ahead: odds 10:1
    assert elo.expected_score(np.array(1900.0), np.array(1500.0)) == pytest.approx(10 / 11)
    assert elo.expected_score(np.array(1500.0), np.array(1900.0)) == pytest.approx(1 / 11)


def test_one_update_by_hand():
    # Pairs (0, 1) and (1, 0); image 0 wins both. Equal ratings: E = 0.5, so +5 / -5 with K = 10, each
    # computed from the round-start ratings (an image's later update overwrites its earlier one).
    out = elo.elo_round(np.array([1500.0, 1500.0]), np.array([1, 0]), np.array([1.0, 0.0]), 10.0)
    np.testing.assert_allclose(out, [1505.0, 1495.0])


@pytest.mark.parametrize("n", [2, 3, 7, 64])
def test_elo_round_matches_bigasp_loop(n):
    g = np.random.default_rng(n)
    for trial in range(20):
        ratings = 1500 + g.normal(0, 80, n)
        perm = elo.derangement(n, rng(0, "t", n, trial))
        p = g.random(n)
        paths = [f"img{i}" for i in range(n)]
        ref = dict(zip(paths, ratings.tolist(), strict=True))
        bigasp_do_round(paths, [paths[j] for j in perm], ref, p.tolist())
        ours = elo.elo_round(ratings, perm, (p > 0.5).astype(float), 10.0)
        np.testing.assert_allclose(ours, [ref[q] for q in paths], rtol=0, atol=1e-9)


def test_derangement_has_no_fixed_point_and_is_uniform():
    g = rng(0, "derangement-test")
    for n in (2, 3, 5, 100):
        for _ in range(50):
            d = elo.derangement(n, g)
            assert sorted(d.tolist()) == list(range(n))
            assert not np.any(d == np.arange(n))
    # n = 3 has exactly two derangements, (1, 2, 0) and (2, 0, 1): each about half the time.
    counts = {}
    for _ in range(2000):
        t = tuple(elo.derangement(3, g).tolist())
        counts[t] = counts.get(t, 0) + 1
    assert set(counts) == {(1, 2, 0), (2, 0, 1)}
    assert 850 < counts[(1, 2, 0)] < 1150
    with pytest.raises(ValueError):
        elo.derangement(1, g)


def test_derangement_is_keyed():
    a = elo.derangement(50, rng(3, "elo-round", 7))
    b = elo.derangement(50, rng(3, "elo-round", 7))
    c = elo.derangement(50, rng(3, "elo-round", 8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_bins_match_bigasp_expression_and_edges():
    g = random.Random(0)
    rankings = {f"p{i}": g.uniform(1200, 1800) for i in range(500)}
    rankings["low"], rankings["high"] = 1100.0, 1900.0
    min_ranking, max_ranking = min(rankings.values()), max(rankings.values())
    bin_size = (max_ranking - min_ranking) / 10
    ref = {p: min(10 - 1, int((r - min_ranking) / bin_size)) for p, r in rankings.items()}
    ours = elo.to_bins(np.array(list(rankings.values())))
    assert ours.tolist() == list(ref.values())
    assert ref["low"] == 0 and ref["high"] == 9
    edges = elo.bin_edges(np.array([0.0, 10.0]), 10)
    np.testing.assert_allclose(edges, np.arange(11.0))
    # On an edge a value goes up into the next bin; the maximum stays in the top bin.
    assert elo.to_bins(np.array([0.0, 1.0, 2.0, 9.999, 10.0])).tolist() == [0, 1, 2, 9, 9]
    # Equal-width, not quantiles: one outlier leaves the middle bins empty.
    assert np.bincount(elo.to_bins(np.array([0.0, 0.1, 0.2, 100.0])), minlength=10).tolist() == [3] + [
        0
    ] * 8 + [1]
    assert elo.to_bins(np.array([5.0, 5.0, 5.0])).tolist() == [0, 0, 0]


def test_tournament_recovers_a_noiseless_order():
    strength = rng(0, "strength").normal(0, 1, 60)

    def judge(first, second):
        return (strength[first] > strength[second]).astype(float)

    ratings = elo.tournament(judge, 60, rounds=300, seed=1)
    assert spearmanr(ratings, strength).statistic > 0.97
    again = elo.tournament(judge, 60, rounds=300, seed=1)
    assert np.array_equal(ratings, again)
