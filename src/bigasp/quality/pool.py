"""The arena's image pool and pair selection (bigASP's manual_scoring.py).

The pool is every image already rated by a human plus a random top-up to `size` images
(bigASP: DATASET_LEN = 4000). The top-up order is a keyed hash of (seed, id), so the pool
is the same after a restart and grows stably with the dataset. Pairs are unordered pairs of
pool images nobody has rated yet; `uncertain` prefers those the current model calls closest
to 50/50, `flagged` pits a flagged image (bigASP: a grid) against an unflagged one unless the
model is already confident the flagged image loses.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigasp.errors import DataError
from bigasp.prep.sources import Ref
from bigasp.quality.images import manifest_ref
from bigasp.quality.keys import key64, rng
from bigasp.quality.ratings import RatingStore
from bigasp.store import layout
from bigasp.store.manifest import read_manifest

MODES = ("random", "uncertain", "flagged")


@dataclass(frozen=True)
class PoolImage:
    id: str
    ref: Ref
    orientation: int


def choose_pool(candidates: list[str], rated: set[str], size: int, seed: int) -> list[str]:
    """Rated candidates first, topped up in keyed-hash order; returned sorted by id."""
    cand = set(candidates)
    chosen = sorted(rated & cand)
    rest = sorted(cand - set(chosen), key=lambda i: key64(seed, "pool", i))
    chosen += rest[: max(0, size - len(chosen))]
    return sorted(chosen)


def load_pool(
    root: str | Path, store: RatingStore, size: int, seed: int, embedded: set[str] | None
) -> list[PoolImage]:
    """Pool images with where their bytes are; `embedded` limits the candidates when given."""
    fs, path = layout.url_to_fs(root)
    m = read_manifest(fs, path, ["id", "path", "tar_offset", "file_size", "orientation", "row"]).to_pydict()
    if not m["id"]:
        raise DataError(f"{root}/{layout.MANIFEST} has no images; run `bigasp ingest` first")
    rows = {i: k for k, i in enumerate(m["id"])}
    candidates = [i for i in m["id"] if embedded is None or i in embedded]
    if len(candidates) < 2:
        raise DataError(f"{root}: fewer than 2 images with embeddings; run `bigasp annotate --stage embed`")
    out = []
    for iid in choose_pool(candidates, store.rated_images(), size, seed):
        k = rows[iid]
        ref = manifest_ref(m["path"][k], m["tar_offset"][k], m["file_size"][k], m["row"][k])
        out.append(PoolImage(iid, ref, m["orientation"][k] or 1))
    return out


class PairPicker:
    """Draws pairs of pool indices; every draw is keyed by (seed, draw number)."""

    def __init__(
        self, n: int, store: RatingStore, ids: list[str], *, seed: int = 0, judge=None,
        flagged: np.ndarray | None = None, candidates: int = 256, flagged_confidence: float = 0.9,
    ) -> None:  # fmt: skip
        self.n, self.store, self.ids, self.seed = n, store, ids, seed
        self.judge = judge  # judge(first_idx, second_idx) -> P(first better), or None
        self.flagged = np.zeros(n, bool) if flagged is None else flagged
        self.candidates = candidates
        self.flagged_confidence = flagged_confidence
        self._draws = 0
        self._lock = threading.Lock()
        self.excluded: set[int] = set()  # pool slots whose image could not be read

    def exclude(self, slot: int) -> None:
        """Never pair this image again (its file is gone or damaged)."""
        with self._lock:
            self.excluded.add(int(slot))

    def _usable(self, i: int, j: int) -> bool:
        return i != j and i not in self.excluded and j not in self.excluded

    def total_pairs(self) -> int:
        """Pairs a rater can still be shown: those of two readable pool images."""
        usable = self.n - len(self.excluded)
        return usable * (usable - 1) // 2

    def rated_in_pool(self, rated: set[tuple[str, str]]) -> int:
        """Rated pairs among the readable pool images (the count `total_pairs` is taken from)."""
        with self._lock:
            gone = {self.ids[k] for k in self.excluded}
        pool = set(self.ids) - gone
        return sum(1 for a, b in rated if a in pool and b in pool)

    def _rng(self) -> np.random.Generator:
        with self._lock:
            self._draws += 1
            return rng(self.seed, "pair", self._draws)

    def _unrated(
        self, g: np.random.Generator, rated: set[tuple[str, str]], want: int
    ) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        for _ in range(max(200, want * 20)):
            i, j = (int(v) for v in g.choice(self.n, 2, replace=False))
            a, b = self.ids[i], self.ids[j]
            if self._usable(i, j) and (min(a, b), max(a, b)) not in rated:
                found.append((i, j))
                if len(found) >= want:
                    return found
        if found:
            return found
        # Nearly everything rated: scan the remaining pairs in a random order.
        for i in g.permutation(self.n):
            for j in g.permutation(self.n):
                a, b = self.ids[int(i)], self.ids[int(j)]
                if self._usable(int(i), int(j)) and (min(a, b), max(a, b)) not in rated:
                    return [(int(i), int(j))]
        return []

    def pick(self, mode: str = "random") -> tuple[int, int] | None:
        """(left, right) pool indices of an unrated pair, or None when every pair is rated."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        g = self._rng()
        rated = self.store.rated_pairs()
        if mode == "flagged":
            return self._pick_flagged(g, rated)
        if mode == "uncertain" and self.judge is not None:
            cands = self._unrated(g, rated, self.candidates)
            if not cands:
                return None
            first = np.array([c[0] for c in cands])
            second = np.array([c[1] for c in cands])
            distance = np.abs(np.asarray(self.judge(first, second), np.float64) - 0.5)
            distance[~np.isfinite(distance)] = np.inf  # no probability (NaN embedding): last resort
            return cands[int(np.argmin(distance))]
        cands = self._unrated(g, rated, 1)
        return cands[0] if cands else None

    def _pick_flagged(self, g: np.random.Generator, rated: set[tuple[str, str]]) -> tuple[int, int] | None:
        flagged = np.flatnonzero(self.flagged)
        others = np.flatnonzero(~self.flagged)
        if len(flagged) == 0 or len(others) == 0:
            return None
        for _ in range(self.candidates):
            f, o = int(g.choice(flagged)), int(g.choice(others))
            a, b = self.ids[f], self.ids[o]
            if not self._usable(f, o) or (min(a, b), max(a, b)) in rated:
                continue
            if self.judge is not None:
                p_flagged_loses = 1.0 - float(self.judge(np.array([f]), np.array([o]))[0])
                if np.isfinite(p_flagged_loses) and p_flagged_loses >= self.flagged_confidence:
                    continue
            return (f, o) if g.random() < 0.5 else (o, f)
        return None
