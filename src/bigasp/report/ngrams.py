"""Caption words and n-gram counts, streamed over Arrow batches with bounded memory.

Words: captions are lower-cased and every run of characters that is not a letter or digit
becomes a word break, except an apostrophe between two letters/digits of the same caption (so
"Woman's 'close-up'!" -> woman's / close / up). The text work is vectorised: numpy rewrites the
UTF-8 buffer (lower case, every other byte a space), Arrow splits it at the spaces and
dictionary-encodes the words (its regex kernel first handles the few non-ASCII captions);
Python touches only each batch's distinct words.

Counting: unigrams are exact (a bincount over word ids). For n >= 2 the number of distinct
n-grams over millions of captions is far larger than memory (almost every 7-gram is unique),
so each n keeps at most `capacity` candidates and drops the smallest counts when full
("lossy counting"): a kept n-gram's count is exact except that occurrences seen before it
was last dropped are missing; `max_undercount` (the sum of the drop thresholds) bounds that
loss. The n-grams that matter here (thousands of uses) are far above it. Within a batch,
n-grams are grouped by exact keys (no collision can merge two of them). Across batches the kept
candidates are keyed by a 41-bit hash of their word ids, so two n-grams with one hash are
counted as one: a shown n-gram (one of the top 10k) shares its hash with some other candidate
with odds of about 10k x (distinct candidates ever kept) / 2^41, ~0.5% per million distinct
candidates per n, and then gains that other n-gram's count (small: it was a rare one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_N = 7
_KEY_BITS = 41  # the candidates' hash keys
_K1 = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_U8 = {k: np.uint8(k) for k in (5, 10, 26, 32, 39, 48, 97)}


_SCRATCH: dict[str, np.ndarray] = {}


def _scratch(name: str, n: int, dtype: type) -> np.ndarray:
    """A work array of `n` items kept between batches (its contents are garbage): a fresh
    array of tens of MB per batch costs the OS zeroing its pages, more than the work on it.
    Each name has one user at a time; nothing returned to a caller lives in one."""
    a = _SCRATCH.get(name)
    if a is None or len(a) < n:
        a = _SCRATCH[name] = np.empty(max(n, 2 * len(a) if a is not None else n), dtype)
    return a[:n]


def _spaced_text(captions: pa.Array) -> pa.Array:
    """The captions, lower-cased, with every byte that is not part of a word turned into a space.

    Nulls become empty strings. ASCII is done with numpy on the raw UTF-8 buffer (a handful of
    passes); the few non-ASCII captions are first lower-cased and stripped of Unicode
    punctuation by Arrow's (slower) regex kernel, after which their bytes >= 0x80 are letters.
    """
    n = len(captions)
    text = pc.fill_null(captions.cast(pa.string()), "")
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks() if text.num_chunks != 1 else text.chunk(0)
    non_ascii = pc.invert(pc.string_is_ascii(text))
    if pc.any(non_ascii).as_py():
        fixed = pc.replace_substring_regex(pc.utf8_lower(text.filter(non_ascii)), r"[^\p{L}\p{N}']+", " ")
        text = pc.replace_with_mask(text, non_ascii, fixed)
    if n == 0:
        return text
    width = 8 if pa.types.is_large_string(text.type) else 4
    buffers = text.buffers()
    offsets = np.frombuffer(buffers[1], np.int64 if width == 8 else np.int32, n + 1, text.offset * width)
    lo, hi = int(offsets[0]), int(offsets[-1])
    d = np.frombuffer(buffers[2], np.uint8, hi - lo, lo) if hi > lo else np.zeros(0, np.uint8)
    m = hi - lo
    t = _scratch("bytes", m, np.uint8)
    letter = _scratch("letter", m, np.bool_)
    word = _scratch("word", m, np.bool_)
    np.subtract(np.bitwise_or(d, _U8[32], out=t), _U8[97], out=t)
    np.less(t, _U8[26], out=letter)
    np.less(np.subtract(d, _U8[48], out=t), _U8[10], out=word)
    word |= letter
    word |= np.right_shift(d, 7, out=t).view(np.bool_)  # bytes >= 0x80
    out = np.left_shift(letter.view(np.uint8), _U8[5])  # lower case: A-Z -> a-z
    out |= d
    out -= _U8[32]  # (out - 32) * word + 32: the word's byte, or a space
    out *= word.view(np.uint8)
    out += _U8[32]
    # an apostrophe is part of a word only between two word characters of the same caption
    apos = np.flatnonzero(np.equal(d, _U8[39], out=letter))
    if len(apos):
        at = apos + lo
        c = np.searchsorted(offsets, at, side="right") - 1
        a = apos[(at > offsets[c]) & (at + 1 < offsets[np.minimum(c + 1, n)])]
        out[a[word[a - 1] & word[a + 1]]] = _U8[39]
    rel = offsets - lo if lo else offsets
    return pa.Array.from_buffers(text.type, n, [None, pa.py_buffer(rel), pa.py_buffer(out)])


def caption_ids(captions: pa.Array) -> tuple[np.ndarray, pa.Array, np.ndarray, np.ndarray]:
    """(word id of each word, dictionary id -> word, caption index of each word, words per caption).

    Word order is kept, so consecutive words of one caption are consecutive in the output
    (n-grams never cross a caption boundary). The dictionary may hold an entry, "", that no
    word refers to (Arrow's split gives one for a caption without words).
    """
    n = len(captions)
    parts = pc.ascii_split_whitespace(pc.ascii_trim_whitespace(_spaced_text(captions)))
    enc = pc.dictionary_encode(pc.list_flatten(parts))
    ids = enc.indices.to_numpy(zero_copy_only=False)
    doc = pc.list_parent_indices(parts).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    per = pc.fill_null(pc.list_value_length(parts), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    empty = pc.index(enc.dictionary, "").as_py() if len(enc.dictionary) else -1
    if empty >= 0:  # only captions without words (trimmed, the rest have no empty part)
        keep = ids != empty
        per -= np.bincount(doc[~keep], minlength=n)
        ids, doc = ids[keep], doc[keep]
    return ids, enc.dictionary, doc, per


def caption_words(captions: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """(words, caption index of each word, words per caption) for a flat array of captions.

    Null captions count as empty; see `caption_ids` (the same split, as text).
    """
    ids, dictionary, doc, per = caption_ids(captions)
    return dictionary.take(pa.array(ids)), doc, per


def _row_keys(ids: np.ndarray) -> np.ndarray:
    """The candidates' keys for the n-grams whose word ids are the rows of `ids`: a hash."""
    h = ids[:, 0].astype(np.uint64)
    for j in range(1, ids.shape[1]):
        h = _mix(h * _K1 ^ ids[:, j].astype(np.uint64))
    return h >> np.uint64(64 - _KEY_BITS)


def _mix(h: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, vectorised (uint64 arithmetic wraps, as intended)."""
    h = (h ^ (h >> _S30)) * _M1
    h = (h ^ (h >> _S27)) * _M2
    return h ^ (h >> _S31)


_IOTA = np.zeros(0, np.uint64)


def _iota(m: int) -> np.ndarray:
    """0..m-1 as uint64, a view of one cached array: making a fresh one per batch (and the OS
    zeroing its pages) costs more than the sort it feeds."""
    global _IOTA
    if len(_IOTA) < m:
        _IOTA = np.arange(max(m, 2 * len(_IOTA)), dtype=np.uint64)
    return _IOTA[:m]


def _sort_groups(
    key: np.ndarray, key_bits: int, scratch: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order that sorts `key`, where each run of equal keys starts in that order, sorted keys).

    `key` (int64 >= 0 or uint64) is overwritten; `scratch` names a `_scratch` array to hold the
    order. Sorting `key << b | index` as one uint64 with a plain sort is far faster than an
    argsort; when `key_bits` + b do not fit in 64 bits a stable argsort does it instead.
    """
    m = len(key)
    pos_bits = max(m - 1, 1).bit_length()
    if key_bits + pos_bits <= 64:
        packed = key.view(np.uint64)
        packed <<= np.uint64(pos_bits)
        packed |= _iota(m)
        packed.sort()
        out = _scratch(scratch, m, np.uint64) if scratch else None
        order = np.bitwise_and(packed, np.uint64((1 << pos_bits) - 1), out=out).view(np.int64)
        packed >>= np.uint64(pos_bits)
        sorted_key = packed
    else:
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
    new = np.empty(m, bool)
    new[:1] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=new[1:])
    return order, np.flatnonzero(new), sorted_key


def _by_position(idx: np.ndarray, gid: np.ndarray, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """`idx` (distinct, >= 0) and its `gid` (< n_ids), sorted by `idx`: one plain sort of
    `idx << b | gid`, which beats scattering `gid` to `idx` (random writes) several-fold."""
    gid_bits = max(n_ids - 1, 1).bit_length()
    if max(len(idx), int(idx.max(initial=0)) + 1).bit_length() + gid_bits > 64:
        order = np.argsort(idx)
        return idx[order], gid[order]
    packed = idx.astype(np.uint64)
    packed <<= np.uint64(gid_bits)
    packed |= gid.view(np.uint64)
    packed.sort()
    gid = np.bitwise_and(packed, np.uint64((1 << gid_bits) - 1)).view(np.int64)
    packed >>= np.uint64(gid_bits)
    return packed.view(np.int64), gid


@dataclass
class _Candidates:
    """Kept n-grams of one n: hash, count, and the word ids of one occurrence."""

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
        order, starts, sorted_keys = _sort_groups(all_keys, _KEY_BITS)
        self.keys = sorted_keys[starts]
        self.counts = np.add.reduceat(all_counts[order], starts) if len(order) else all_counts
        self.ids = np.concatenate([self.ids, ids])[order[starts]]
        if len(self.keys) > capacity:
            threshold = int(
                np.partition(self.counts, len(self.counts) - capacity)[len(self.counts) - capacity]
            )
            keep = self.counts > threshold
            self.keys, self.counts, self.ids = self.keys[keep], self.counts[keep], self.ids[keep]
            self.max_undercount += threshold


class NgramCounter:
    """Top n-grams (n = 1..max_n) over a stream of captions; see the module doc for accuracy."""

    def __init__(self, max_n: int = MAX_N, capacity: int = 1_000_000, step_words: int = 8_000_000):
        if not 1 <= max_n <= MAX_N:
            raise ValueError(f"max_n must be in 1..{MAX_N}")
        self.max_n = max_n
        self.capacity = capacity
        self.step_words = step_words
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []
        self.unigram = np.zeros(0, np.int64)
        self.cands = {n: _Candidates(n) for n in range(2, max_n + 1)}
        self.captions = 0
        self.total_words = 0

    def _global_ids(self, dictionary: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(this counter's id of each dictionary word, which entries are words): new words are
        registered; Python sees only the batch's distinct words. "" is not a word."""
        lut = np.zeros(len(dictionary), np.int64)
        real = np.ones(len(dictionary), bool)
        vocab, names = self.vocab, self.words
        for i, w in enumerate(dictionary.to_pylist()):
            if not w:
                real[i] = False
                continue
            v = vocab.get(w)
            if v is None:
                v = vocab[w] = len(names)
                names.append(w)
            lut[i] = v
        return lut, real

    def add_words(self, words: pa.Array, doc: np.ndarray, n_docs: int) -> None:
        """Count one batch: `words` flat, `doc[i]` = which caption word i belongs to (ascending)."""
        if isinstance(words, pa.ChunkedArray):
            words = words.combine_chunks()
        enc = pc.dictionary_encode(words)
        self.add_ids(enc.indices.to_numpy(zero_copy_only=False), enc.dictionary, doc, n_docs)

    def add_ids(self, ids: np.ndarray, dictionary: pa.Array, doc: np.ndarray, n_docs: int) -> None:
        """Count one batch given as ids into `dictionary` (as `caption_ids` returns it)."""
        self.captions += n_docs
        self.total_words += len(ids)
        if len(ids) == 0:
            return
        lut, real = self._global_ids(dictionary)
        if len(self.unigram) < len(self.words):
            grow = np.zeros(len(self.words) - len(self.unigram), np.int64)
            self.unigram = np.concatenate([self.unigram, grow])
        self.unigram[lut[real]] += np.bincount(ids, minlength=len(lut))[real]
        if self.max_n < 2:
            return
        glob = lut.astype(np.int32)[ids]
        # split at caption boundaries into steps of at most `step_words` words
        start = 0
        while start < len(ids):
            stop = min(len(ids), start + self.step_words)
            if stop < len(ids):
                stop = start + int(np.searchsorted(doc[start:stop], doc[stop], side="left"))
                if stop == start:  # one caption longer than a step: take it whole
                    stop = start + int(np.searchsorted(doc[start:], doc[start], side="right"))
            self._add_ngrams(ids[start:stop], len(lut), glob[start:stop], doc[start:stop])
            start = stop

    def _add_ngrams(self, local: np.ndarray, n_local: int, glob: np.ndarray, doc: np.ndarray) -> None:
        """Count the n-grams (n = 2..max_n) of one step, one n after the other.

        Level n groups its positions by an exact key, the pair of dense ids of the (n-1)-grams
        at i and i+1 (for n = 2: the two word ids), so ids stay small and no hash is needed
        inside a step. Once the candidates of some n are full, n-grams seen once in the step
        are dropped (at most 1 lost per step, added to `max_undercount`); an (n+1)-gram can
        occur twice only where both of its n-grams did, so from then on each level only looks
        at the positions whose n-grams repeated: a small share for large n.
        """
        m = len(local)
        last = np.flatnonzero(doc[:-1] != doc[1:])  # last word of each caption but the final one
        lengths = np.diff(last, prepend=-1, append=m - 1)
        # level 2 at every position; a caption's last word starts no 2-gram: it gets a key of
        # its own, above every real one, whose group is left out
        sentinel = n_local * n_local
        key = _scratch("key", m - 1, np.int64)
        key[:] = local[:-1]
        key *= n_local
        key += local[1:]
        key[last] = sentinel
        key_bits = max(sentinel, 1).bit_length()
        pos: np.ndarray | None = None  # positions of the keys (None: 0..len-1)
        prune = False
        for n in range(2, self.max_n + 1):
            cand = self.cands[n]
            if len(key) == 0:  # no position left (or none at all): every n-gram was seen once
                if prune and (lengths > n - 1).any():
                    cand.max_undercount += 1
                continue
            order, starts, sorted_key = _sort_groups(key, key_bits, "order" if pos is None else None)
            counts = np.diff(starts, append=len(order))
            groups = len(starts)
            if pos is None and sorted_key[-1] == sentinel:
                groups -= 1
            prune = prune or len(cand.keys) + groups > self.capacity
            if prune:
                repeated = counts[:groups] >= 2
                valid = int(np.maximum(lengths - (n - 1), 0).sum())
                seen = int(counts[:groups].sum())
                if seen < valid or not repeated.all():
                    cand.max_undercount += 1
                sel = np.flatnonzero(repeated)
            else:
                sel = np.arange(groups)
            if len(sel):
                first = order[starts[sel]]
                at = first if pos is None else pos[first]
                grams = glob[at[:, None] + np.arange(n)]
                cand.merge(_row_keys(grams), counts[sel], grams, self.capacity)
            if n == self.max_n:
                break
            # the kept n-grams' positions, in position order, with a dense id per n-gram
            if prune:
                chosen = np.zeros(len(starts), bool)
                chosen[:groups] = repeated
                idx = order[np.repeat(chosen, counts)]
            else:
                idx = order[: starts[groups] if groups < len(starts) else len(order)]
            gid = np.repeat(np.arange(len(sel), dtype=np.int64), counts[sel])
            idx, gid = _by_position(idx, gid, len(sel))
            at = idx if pos is None else pos[idx]
            nxt = np.flatnonzero(np.diff(at) == 1)
            pos = at[nxt]
            key = gid[nxt]
            key *= len(sel)
            key += gid[1:][nxt]
            key_bits = 2 * max(len(sel) - 1, 1).bit_length()

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
        ids, dictionary, doc, per_caption = caption_ids(captions)
        self.add_ids(ids, dictionary, doc, len(captions))
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
