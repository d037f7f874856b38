"""Bucketed, distributed, resumable batch order, computed with vectorised numpy.

Every row gets a bucket: its latent resolution and (optionally) its estimated chunk count,
so a batch pads only to its own longest prompt (bigASP v2 `gen_buckets`). Each epoch:

1. one permutation of all rows, then a stable sort by bucket id: rows are shuffled
   *within* their bucket (two O(N) numpy passes, no per-row Python objects);
2. each bucket is cut into full device batches; the remainder is dropped for this epoch
   (a different remainder next epoch, since the shuffle differs);
3. the batches are shuffled globally.

Both shuffles are keyed by `(seed, epoch)` only. The batch list does NOT depend on the
world size: step `t` of a run at position `p` gives rank `r` batch `p + r`, and the
position advances by `world_size`. Hence the state `(epoch, position)` counted in
*batches* resumes exactly, and a resume on a different number of ranks continues the very
same batch sequence. A different device batch size re-plans the epoch and continues from
the same *sample* position (see `resume_position`). At 13M rows an epoch plan takes a few
seconds and ~0.5 GB (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from bigasp.text.synthesis import prompt_rng

log = logging.getLogger(__name__)

STATE_VERSION = 1
# A planned entry is `row | copy << COPY_SHIFT`: the copy number of a row repeated within an epoch
# by dataset mixing (train/mixing.py); 0 for every entry of an unmixed plan.
COPY_SHIFT = 40
ROW_MASK = (1 << COPY_SHIFT) - 1


def chunk_estimates(token_estimates: np.ndarray, quality_tokens: float, max_chunks: int = 3) -> np.ndarray:
    """Estimated chunk count per row: ceil((tokens + quality tokens) / 75) clamped to [1, max_chunks]."""
    t = np.asarray(token_estimates, dtype=np.float32) + np.float32(quality_tokens)
    return np.clip(np.ceil(t / 75.0), 1, max_chunks).astype(np.int8)


@dataclass(frozen=True)
class RowBuckets:
    """Rows grouped by (height, width, chunk estimate); arrays aligned with `rows`."""

    rows: np.ndarray  # int64 dataset row indices
    keys: np.ndarray  # int16 bucket id per row
    bucket_hw: np.ndarray  # [K,2] int32 (height, width) in pixels
    bucket_chunks: np.ndarray  # [K] int8 estimated chunks (0 = chunk bucketing off)
    counts: np.ndarray  # [K] int64 rows per bucket

    @property
    def n_buckets(self) -> int:
        return len(self.counts)

    def describe(self, k: int) -> str:
        h, w = self.bucket_hw[k]
        c = int(self.bucket_chunks[k])
        return f"{w}x{h}" + (f"/{c}ch" if c else "")


def build_row_buckets(
    rows: np.ndarray, heights: np.ndarray, widths: np.ndarray, chunks: np.ndarray | None = None
) -> RowBuckets:
    """Bucket ids for `rows` (heights/widths/chunks are per-row, aligned with `rows`)."""
    rows = np.asarray(rows, dtype=np.int64)
    h = np.asarray(heights, dtype=np.int64)
    w = np.asarray(widths, dtype=np.int64)
    c = np.zeros(len(rows), dtype=np.int64) if chunks is None else np.asarray(chunks, dtype=np.int64)
    if not (len(h) == len(w) == len(c) == len(rows)):
        raise ValueError("rows, heights, widths and chunks must have the same length")
    if len(rows) and (h.min() < 0 or w.min() < 0 or c.min() < 0 or c.max() > 255):
        raise ValueError("bucket sizes must be non-negative and chunk estimates in 0..255")
    if len(rows) and (h % 8 == 0).all() and (w % 8 == 0).all() and max(h.max(), w.max()) < 8 * 4096:
        # O(N) with no sort of N rows: dense indices of the few distinct heights and widths,
        # a compact (h, w, c) code, bincount + lookup table.
        hv, hi = _dense(h >> 3)
        wv, wi = _dense(w >> 3)
        code = (hi * len(wv) + wi) * 256 + c
        present = np.flatnonzero(np.bincount(code))
        lut = np.zeros(int(present[-1]) + 1, dtype=np.int32)
        lut[present] = np.arange(len(present), dtype=np.int32)
        keys = lut[code]
        uniq = present.astype(np.int64)
        hw = np.stack([hv[uniq // 256 // len(wv)] << 3, wv[(uniq // 256) % len(wv)] << 3], axis=1).astype(
            np.int32
        )
        uniq = uniq % 256  # chunk estimate per bucket
    else:
        code = (h << 32) | (w << 8) | c
        uniq, keys = np.unique(code, return_inverse=True)
        hw = np.stack([uniq >> 32, (uniq >> 8) & 0xFFFFFF], axis=1).astype(np.int32)
    del code
    if len(uniq) > np.iinfo(np.int16).max:
        raise ValueError(f"{len(uniq)} buckets is more than supported (32767)")
    return RowBuckets(
        rows=rows,
        keys=keys.astype(np.int16),
        bucket_hw=hw,
        bucket_chunks=(uniq & 0xFF).astype(np.int8),
        counts=np.bincount(keys, minlength=len(uniq)).astype(np.int64),
    )


def _dense(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values ascending, index of each element) for small non-negative ints, in O(N)."""
    values = np.flatnonzero(np.bincount(v))
    lut = np.zeros(int(values[-1]) + 1, dtype=np.int64)
    lut[values] = np.arange(len(values))
    return values.astype(np.int64), lut[v]


@dataclass(frozen=True)
class EpochPlan:
    """The epoch's global list of device batches (independent of the world size)."""

    epoch: int
    device_batch_size: int
    order: np.ndarray  # int64 row ids, grouped by bucket, shuffled within bucket
    batch_starts: np.ndarray  # int64 [n_batches] offsets into `order`, in batch order
    batch_bucket: np.ndarray  # int16 [n_batches]
    leftover_samples: int  # rows in incomplete per-bucket batches (dropped this epoch)
    tiny_buckets: tuple[int, ...]  # buckets with fewer rows than one batch (all dropped)

    @property
    def n_batches(self) -> int:
        return len(self.batch_starts)

    def batch_rows(self, i: int) -> np.ndarray:
        s = int(self.batch_starts[i])
        return self.order[s : s + self.device_batch_size] & ROW_MASK

    def trained_rows(self, n_batches: int) -> np.ndarray:
        """Row ids of the first `n_batches` batches, in batch order (copies appear once each)."""
        at = self.batch_starts[:n_batches, None] + np.arange(self.device_batch_size, dtype=np.int64)
        return self.order[at.ravel()] & ROW_MASK

    def steps_from(self, position: int, world_size: int) -> int:
        """Full steps (one batch per rank) left from global batch `position`."""
        return max(0, (self.n_batches - position) // world_size)

    def rank_positions(self, position: int, rank: int, world_size: int) -> np.ndarray:
        """Global batch positions this rank trains on from `position` to the end of the epoch."""
        return position + rank + world_size * np.arange(self.steps_from(position, world_size), dtype=np.int64)

    def tail_dropped(self, position: int, world_size: int) -> int:
        """Batches at the end that do not fill a step on every rank (dropped this epoch)."""
        return max(0, self.n_batches - position) % world_size


def plan_epoch(
    buckets: RowBuckets, *, seed: int, epoch: int, device_batch_size: int, wave: int = 0
) -> EpochPlan:
    """The shuffled batch list of one epoch (pure function of buckets, seed, epoch, batch size).

    `wave` > 0 keys the plan of one wave of a streaming first pass (train/stream.py) apart from
    the others; 0 is the ordinary epoch plan."""
    b = int(device_batch_size)
    if b < 1:
        raise ValueError("device_batch_size must be >= 1")
    rng = prompt_rng(seed, epoch, wave, domain=b"epoch-order")
    n = len(buckets.rows)
    perm = rng.permutation(n)
    within = np.argsort(buckets.keys[perm], kind="stable")  # radix sort on int16
    order = buckets.rows[perm[within]]
    del perm, within
    counts = buckets.counts
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    nb = counts // b
    bucket_of = np.repeat(np.arange(len(counts), dtype=np.int16), nb)
    first = np.repeat(np.cumsum(nb) - nb, nb)
    batch_starts = starts[bucket_of] + (np.arange(len(bucket_of), dtype=np.int64) - first) * b
    bperm = rng.permutation(len(batch_starts))
    tiny = tuple(int(k) for k in np.flatnonzero((counts > 0) & (counts < b)))
    return EpochPlan(
        epoch=epoch,
        device_batch_size=b,
        order=order,
        batch_starts=batch_starts[bperm],
        batch_bucket=bucket_of[bperm],
        leftover_samples=int((counts - nb * b).sum()),
        tiny_buckets=tiny,
    )


def plan_for_rank(
    heights: np.ndarray,
    widths: np.ndarray,
    token_estimates: np.ndarray | None,
    *,
    seed: int,
    epoch: int,
    device_batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    quality_tokens: float = 8.25,
    max_chunks: int = 3,
) -> tuple[RowBuckets, EpochPlan, np.ndarray]:
    """Everything a rank computes before its first batch, from plain per-row integer columns.

    For benchmarks and tools: rows are `0..N-1`; `token_estimates=None` buckets by resolution
    only. Returns the buckets, the epoch plan and this rank's global batch positions.
    """
    n = len(heights)
    chunks = None if token_estimates is None else chunk_estimates(token_estimates, quality_tokens, max_chunks)
    buckets = build_row_buckets(np.arange(n, dtype=np.int64), heights, widths, chunks)
    plan = plan_epoch(buckets, seed=seed, epoch=epoch, device_batch_size=device_batch_size)
    return buckets, plan, plan.rank_positions(0, rank, world_size)


def eval_plan(buckets: RowBuckets, *, device_batch_size: int) -> list[np.ndarray]:
    """Deterministic bucket-homogeneous batches using every row once (last of a bucket may be short)."""
    order = buckets.rows[np.argsort(buckets.keys, kind="stable")]
    out: list[np.ndarray] = []
    start = 0
    for count in buckets.counts:
        for s in range(0, int(count), device_batch_size):
            out.append(order[start + s : start + min(s + device_batch_size, int(count))])
        start += int(count)
    return out


@dataclass(frozen=True)
class SamplerState:
    """Where the global batch stream stands: `position` batches of `epoch` are consumed."""

    epoch: int
    position: int
    device_batch_size: int
    world_size: int
    seed: int
    n_rows: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "samples_in_epoch": self.position * self.device_batch_size,
            "device_batch_size": self.device_batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
            "n_rows": self.n_rows,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplerState:
        return cls(
            epoch=int(d["epoch"]),
            position=int(d["position"]),
            device_batch_size=int(d["device_batch_size"]),
            world_size=int(d.get("world_size", 1)),
            seed=int(d["seed"]),
            n_rows=int(d.get("n_rows", -1)),
        )


def resume_position(state: SamplerState, device_batch_size: int) -> int:
    """Global batch position to continue from with `device_batch_size`.

    Same batch size: the stored position (exact, whatever the world size). A different
    batch size re-plans the epoch with it; we continue at the same number of samples into
    the epoch (rounded down to a whole batch), so the epoch length and any schedule counted
    in samples stay aligned, while the remaining images of that one epoch are an
    approximation of the not-yet-seen ones (the grouping changed).
    """
    if device_batch_size == state.device_batch_size:
        return state.position
    return (state.position * state.device_batch_size) // device_batch_size
