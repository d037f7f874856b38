"""Caption words and n-gram counts, streamed over Arrow batches with bounded memory.

Words: captions are lower-cased and every run of characters that is not a letter or digit
becomes a word break, except an apostrophe between two letters/digits (so "Woman's 'close-up'!"
-> woman's / close / up). The text work is vectorised (numpy over the UTF-8 buffer, Arrow for
non-ASCII captions); Python touches only each batch's distinct words.

Counting: unigrams are exact (a bincount over word ids). For n >= 2 the number of distinct
n-grams over millions of captions is far larger than memory (almost every 7-gram is unique),
so each n keeps at most `capacity` candidates and drops the smallest counts when full
("lossy counting"): a kept n-gram's count is exact except that occurrences seen before it
was last dropped are missing; `max_undercount` (the sum of the drop thresholds) bounds that
loss. The n-grams that matter here (thousands of uses) are far above it. N-grams are keyed
by a 41-bit hash of their word ids (the low 23 bits of the sort key carry a position); a
collision between two kept n-grams is about 10k^2 / 2^42 ~ 2e-5 likely per n.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_N = 7
_POS_BITS = 23  # positions per merge step < 2**23 (8.4M); larger inputs are split
_POS_MASK = np.uint64((1 << _POS_BITS) - 1)
_K1 = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


_WORD_BYTE = np.zeros(256, bool)  # letters, digits and every byte of a non-ASCII character
_WORD_BYTE[list(b"abcdefghijklmnopqrstuvwxyz0123456789")] = True
_WORD_BYTE[0x80:] = True
_APOSTROPHE = ord("'")


def caption_words(captions: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """(words, caption index of each word, words per caption) for a flat array of captions.

    Null captions count as empty. Word order is kept, so consecutive words of one caption
    are consecutive in the output (n-grams never cross a caption boundary). ASCII text is
    split with numpy over the raw UTF-8 buffer; the few non-ASCII captions are first
    lower-cased and stripped of Unicode punctuation by Arrow's (slower) regex kernel.
    """
    n = len(captions)
    if n == 0:
        return pa.array([], pa.string()), np.zeros(0, np.int64), np.zeros(0, np.int64)
    text = pc.fill_null(captions.cast(pa.string()), "")
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    non_ascii = pc.invert(pc.string_is_ascii(text))
    if pc.any(non_ascii).as_py():
        fixed = pc.replace_substring_regex(pc.utf8_lower(text.filter(non_ascii)), r"[^\p{L}\p{N}']+", " ")
        text = pc.replace_with_mask(text, non_ascii, fixed)
    text = text.cast(pa.large_string()) if len(text) else text
    buffers = text.buffers()
    offsets = np.frombuffer(buffers[1], np.int64, n + 1, text.offset * 8)
    lo, hi = int(offsets[0]), int(offsets[-1])
    data = np.frombuffer(buffers[2], np.uint8, hi - lo, lo).copy() if hi > lo else np.zeros(0, np.uint8)
    offsets = offsets - lo
    upper = (data >= 65) & (data <= 90)
    data[upper] += 32
    word = _WORD_BYTE[data]
    # an apostrophe is part of a word only between two word characters of the same caption
    apos = np.flatnonzero(data == _APOSTROPHE)
    if len(apos):
        inner = (apos > 0) & (apos < len(data) - 1)
        a = apos[inner]
        ok = word[a - 1] & word[a + 1]
        word[a[ok]] = True
    boundary = np.zeros(len(data) + 1, bool)
    boundary[offsets] = True  # captions never share a word
    prev = np.concatenate([[False], word[:-1]]) & ~boundary[:-1]
    nxt = np.concatenate([word[1:], [False]]) & ~boundary[1:]
    starts = np.flatnonzero(word & ~prev)
    ends = np.flatnonzero(word & ~nxt) + 1
    lengths = ends - starts
    word_offsets = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(lengths, out=word_offsets[1:])
    chars = data[word]
    words = pa.LargeStringArray.from_buffers(
        len(starts), pa.py_buffer(word_offsets), pa.py_buffer(chars)
    ).cast(pa.string())
    doc = np.searchsorted(offsets, starts, side="right") - 1
    return words, doc, np.bincount(doc, minlength=n).astype(np.int64)


def _row_keys(ids: np.ndarray) -> np.ndarray:
    """The sort keys `_add_ngrams` gives the n-grams whose word ids are the rows of `ids`."""
    h = ids[:, 0].astype(np.uint64)
    for j in range(1, ids.shape[1]):
        h = _mix(h * _K1 ^ ids[:, j].astype(np.uint64))
    return h >> np.uint64(_POS_BITS)


def _mix(h: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, vectorised (uint64 arithmetic wraps, as intended)."""
    h = (h ^ (h >> _S30)) * _M1
    h = (h ^ (h >> _S27)) * _M2
    return h ^ (h >> _S31)


@dataclass
class _Candidates:
    """Kept n-grams of one n: hash (sorted), count, and the word ids of one occurrence."""

    n: int
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))
    max_undercount: int = 0

    def __post_init__(self) -> None:
        self.ids = np.zeros((0, self.n), np.int32)

    def merge(self, keys: np.ndarray, counts: np.ndarray, ids: np.ndarray, capacity: int) -> None:
        all_keys = np.concatenate([self.keys, keys])
        all_counts = np.concatenate([self.counts, counts])
        all_ids = np.concatenate([self.ids, ids])
        keys, first, totals = _group(all_keys, all_counts)
        self.keys, self.counts, self.ids = keys, totals, all_ids[first]
        if len(self.keys) > capacity:
            threshold = int(
                np.partition(self.counts, len(self.counts) - capacity)[len(self.counts) - capacity]
            )
            keep = self.counts > threshold
            self.keys, self.counts, self.ids = self.keys[keep], self.counts[keep], self.ids[keep]
            self.max_undercount += threshold


def _group(keys: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct keys ascending, index of one occurrence of each, summed weights / counts).

    Sorting `key << 23 | position` with a plain sort is ~10x faster than an argsort and
    still yields one position per group (the key loses its top 23 bits; see module doc).
    """
    if len(keys) == 0:
        return keys, np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(keys) > int(_POS_MASK) + 1:
        raise ValueError(f"at most {int(_POS_MASK) + 1} keys per merge step, got {len(keys)}")
    packed = (keys << np.uint64(_POS_BITS)) | np.arange(len(keys), dtype=np.uint64)
    packed.sort()
    hashes = packed >> np.uint64(_POS_BITS)
    pos = (packed & _POS_MASK).astype(np.int64)
    starts = np.flatnonzero(np.concatenate([[True], hashes[1:] != hashes[:-1]]))
    if weights is None:
        totals = np.diff(np.append(starts, len(packed)))
    else:
        totals = np.add.reduceat(weights[pos], starts)
    return hashes[starts], pos[starts], totals.astype(np.int64)


class NgramCounter:
    """Top n-grams (n = 1..max_n) over a stream of captions; see the module doc for accuracy."""

    def __init__(self, max_n: int = MAX_N, capacity: int = 1_000_000, step_words: int = 4_000_000):
        if not 1 <= max_n <= MAX_N:
            raise ValueError(f"max_n must be in 1..{MAX_N}")
        self.max_n = max_n
        self.capacity = capacity
        self.step_words = min(step_words, int(_POS_MASK) + 1 - capacity)
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []
        self.unigram = np.zeros(0, np.int64)
        self.cands = {n: _Candidates(n) for n in range(2, max_n + 1)}
        self.captions = 0
        self.total_words = 0

    def _word_ids(self, words: pa.Array) -> np.ndarray:
        enc = pc.dictionary_encode(words).combine_chunks() if isinstance(words, pa.ChunkedArray) else None
        enc = enc if enc is not None else pc.dictionary_encode(words)
        lut = np.empty(len(enc.dictionary), np.int64)
        vocab, names = self.vocab, self.words
        for i, w in enumerate(enc.dictionary.to_pylist()):
            v = vocab.get(w)
            if v is None:
                v = vocab[w] = len(names)
                names.append(w)
            lut[i] = v
        return lut[enc.indices.to_numpy(zero_copy_only=False)]

    def add_words(self, words: pa.Array, doc: np.ndarray, n_docs: int) -> None:
        """Count one batch: `words` flat, `doc[i]` = which caption word i belongs to (ascending)."""
        self.captions += n_docs
        self.total_words += len(words)
        if len(words) == 0:
            return
        ids = self._word_ids(words)
        uni = np.bincount(ids, minlength=len(self.words))
        if len(self.unigram) < len(uni):
            self.unigram = np.concatenate([self.unigram, np.zeros(len(uni) - len(self.unigram), np.int64)])
        self.unigram[: len(uni)] += uni
        # split at caption boundaries into steps the 23-bit position field can address
        start = 0
        while start < len(ids):
            stop = min(len(ids), start + self.step_words)
            if stop < len(ids):
                stop = start + int(np.searchsorted(doc[start:stop], doc[stop], side="left"))
                if stop == start:  # one caption longer than a step: take it whole
                    stop = start + int(np.searchsorted(doc[start:], doc[start], side="right"))
            self._add_ngrams(ids[start:stop], doc[start:stop])
            start = stop

    def _add_ngrams(self, ids: np.ndarray, doc: np.ndarray) -> None:
        h = ids.astype(np.uint64)
        ids32 = ids.astype(np.int32)
        for n in range(2, self.max_n + 1):
            m = len(ids) - n + 1
            if m <= 0:
                break
            h = _mix(h[:m] * _K1 ^ ids[n - 1 :].astype(np.uint64))
            valid = np.flatnonzero(doc[:m] == doc[n - 1 :])
            if len(valid) == 0:
                break
            keys = h[valid] >> np.uint64(_POS_BITS)
            ukeys, first, counts = _group(keys, None)
            cand = self.cands[n]
            if len(cand.keys) + len(ukeys) > self.capacity:
                # Full: n-grams seen once in this batch are dropped (at most 1 lost per batch).
                once = counts < 2
                if once.any():
                    ukeys, first, counts = ukeys[~once], first[~once], counts[~once]
                    cand.max_undercount += 1
            start = valid[first]
            grams = ids32[start[:, None] + np.arange(n)]
            cand.merge(ukeys, counts, grams, self.capacity)

    def merge(self, other: NgramCounter) -> None:
        """Add the counts of a counter that saw other captions (another process's share).

        Unigrams add exactly. For n >= 2 a kept count of either side misses at most that side's
        `max_undercount`, and an n-gram one side dropped had at most that many occurrences there,
        so the sum misses at most the sum of the two bounds; merging then keeps `capacity`
        candidates the usual way (its drop threshold is added too). The bound holds as before.
        """
        if other.max_n != self.max_n:
            raise ValueError(f"cannot merge n-gram counters of max_n {other.max_n} and {self.max_n}")
        self.captions += other.captions
        self.total_words += other.total_words
        lut = np.empty(len(other.words), np.int64)
        for i, w in enumerate(other.words):
            v = self.vocab.get(w)
            if v is None:
                v = self.vocab[w] = len(self.words)
                self.words.append(w)
            lut[i] = v
        if len(self.unigram) < len(self.words):
            grow = np.zeros(len(self.words) - len(self.unigram), np.int64)
            self.unigram = np.concatenate([self.unigram, grow])
        self.unigram[lut] += other.unigram[: len(lut)]
        for n, theirs in other.cands.items():
            mine = self.cands[n]
            mine.max_undercount += theirs.max_undercount
            if len(theirs.keys) == 0:
                continue
            ids = lut[theirs.ids].astype(np.int32)
            mine.merge(_row_keys(ids), theirs.counts, ids, self.capacity)

    def add_captions(self, captions: pa.Array) -> np.ndarray:
        """Count a flat array of captions; returns the word count of each caption."""
        words, doc, per_caption = caption_words(captions)
        self.add_words(words, doc, len(captions))
        return per_caption

    def top(self, n: int, k: int) -> list[tuple[str, int, int]]:
        """[(n-gram text, count, max undercount)] of the `k` most frequent n-grams, count descending."""
        if n == 1:
            u = self.unigram
            kth = np.partition(u, len(u) - k)[len(u) - k] if len(u) > k else 1
            pick = np.flatnonzero(u >= max(kth, 1))
            rows = sorted(((self.words[i], int(u[i]), 0) for i in pick), key=lambda r: (-r[1], r[0]))
            return rows[:k]
        c = self.cands[n]
        # every candidate above the k-th count, and those at it; ties broken by text, so the
        # result does not depend on word-id order (which differs when counters were merged)
        pick = np.arange(len(c.counts))
        if len(c.counts) > k:
            kth = np.partition(c.counts, len(c.counts) - k)[len(c.counts) - k]
            pick = np.flatnonzero(c.counts >= kth)
        names = self.words
        rows = [(" ".join(names[i] for i in c.ids[j]), int(c.counts[j]), c.max_undercount) for j in pick]
        rows.sort(key=lambda r: (-r[1], r[0]))
        return rows[:k]
