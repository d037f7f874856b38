"""bigASP's ELO tournament (quality-arena/TrainRanker.ipynb) and its equal-width bins.

Each round pairs image i with image perm[i] for a random derangement `perm`, asks the
pairwise model who wins, thresholds the probability at 0.5 and applies the ELO update with
K = 10 to both images. bigASP computes every update of a round from the ratings at the start
of the round and writes them in pair order, so an image (which plays twice per round: once
as first, once as second image) keeps whichever of its two updates was written last;
`elo_round` reproduces that exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bigasp.quality.keys import rng


def expected_score(rating_a: np.ndarray, rating_b: np.ndarray) -> np.ndarray:
    """ELO expectation that a beats b: 1 / (1 + 10^((Rb - Ra) / 400))."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / 400.0))


def derangement(n: int, generator: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation with no fixed point (rejection sampling; ~e tries).

    bigASP's `random_derangement`, given a list of paths, never rejects (it compares an index
    with a path), so it returns a plain shuffle in which an image can meet itself; this is the
    derangement the notebook meant.
    """
    if n < 2:
        raise ValueError("a derangement needs at least 2 items")
    idx = np.arange(n)
    while True:
        perm = generator.permutation(n)
        if not np.any(perm == idx):
            return perm


def elo_round(ratings: np.ndarray, perm: np.ndarray, first_wins: np.ndarray, k: float) -> np.ndarray:
    """One round: pair i is (i, perm[i]); `first_wins[i]` is the thresholded outcome (1 or 0)."""
    ra, rb = ratings, ratings[perm]
    ea = expected_score(ra, rb)
    eb = expected_score(rb, ra)
    as_first = ra + k * (first_wins - ea)  # new rating of image i from pair i
    as_second = rb + k * ((1.0 - first_wins) - eb)  # new rating of image perm[i] from pair i
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))  # image x plays second in pair inv[x]
    # Pair order is write order: the later of pair x (as first) and pair inv[x] (as second) wins.
    return np.where(inv > np.arange(len(perm)), as_second[inv], as_first)


def tournament(
    judge: Callable[[np.ndarray, np.ndarray], np.ndarray],
    n: int,
    *,
    rounds: int,
    k: float = 10.0,
    start: float = 1500.0,
    seed: int = 0,
    on_round: Callable[[int], None] | None = None,
) -> np.ndarray:
    """ELO ratings of n images after `rounds` rounds; `judge(first, second)` -> P(first better)."""
    ratings = np.full(n, float(start))
    for r in range(rounds):
        perm = derangement(n, rng(seed, "elo-round", r))
        p = np.asarray(judge(np.arange(n), perm), dtype=np.float64)
        ratings = elo_round(ratings, perm, (p > 0.5).astype(np.float64), k)
        if on_round is not None:
            on_round(r)
    return ratings


def bin_edges(ratings: np.ndarray, bins: int = 10) -> np.ndarray:
    """The bins + 1 edges of equal-width bins over [min, max] (not quantiles, as bigASP)."""
    lo, hi = float(np.min(ratings)), float(np.max(ratings))
    return lo + (hi - lo) / bins * np.arange(bins + 1)


def to_bins(
    ratings: np.ndarray, bins: int = 10, *, lo: float | None = None, hi: float | None = None
) -> np.ndarray:
    """bigASP's `min(bins - 1, int((r - r_min) / ((r_max - r_min) / bins)))` for every rating.

    The maximum lands in the top bin; when every rating is equal (zero range) all get bin 0.
    """
    r = np.asarray(ratings, dtype=np.float64)
    lo = float(np.min(r)) if lo is None else lo
    hi = float(np.max(r)) if hi is None else hi
    size = (hi - lo) / bins
    if size <= 0:
        return np.zeros(len(r), dtype=np.int64)
    return np.minimum(bins - 1, np.floor((r - lo) / size)).clip(0).astype(np.int64)
