"""The streaming first pass: train while `bigasp encode` is still writing the dataset.

The v2 card's cluster sat idle for the hour it took to copy precomputed latents over; here a run
with `data.stream = true` starts on whatever shards are published and takes the rest in as it
comes. The order stays a pure function of recorded facts, so a resume replays it exactly:

* Epoch 0 is a sequence of **waves**. When the trainer needs a batch beyond those planned, rank
  0 lists the index files published since the last wave; they are the next wave (the choice is
  broadcast, so every rank takes in the same files at the same step). If there are none, the
  run **waits** (polling every `data.stream_poll_s`) until there are, or until every ingested
  image has a latent or an encode reject: then the pass is over.
* A wave's images become new dataset rows, appended after the older ones (sorted by id among
  themselves), so rows never move and every key `(seed, epoch, row)` stays valid. Their train
  images join the **pool** of rows not yet trained this pass; the pool is bucketed and planned
  like an epoch, keyed by `(seed, 0, wave)`; its full batches are appended to epoch 0's batch
  list and the rows of incomplete bucket batches stay in the pool for the next wave. When the
  pass ends, what is left in the pool (less than a batch per bucket) is dropped, as an epoch's
  remainder is.
* The global batch list never depends on the world size: rank r trains batch p + r as in any
  epoch. Epoch 0 uses latent variant 0 and no `data.mix`; from epoch 1 the whole dataset (rows
  in the order taken in) is planned as usual, with variants and mixing.
* The validation split is decided by the image-id hash cutoff computed from the manifest (all
  ingested images) before any latent exists; the validation and stable sets are the held-out
  and lowest-hash train images taken in so far, so their size grows during the pass (logged).

The checkpoint keeps the waves (their index file names), whether the pass is over, and the
cutoff; `load_state_dict` replays the waves, so batches, prompts and noise continue exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow.compute as pc

from bigasp.errors import ConfigError, DataError
from bigasp.store.streaming import Grow
from bigasp.train.data import (
    CALIBRATION_SAMPLE,
    Batch,
    BatchItem,
    DataConfig,
    Split,
    TrainLoader,
    id_hashes,
    row_chunk_estimates,
    row_token_estimates,
    split_dataset,
    tokens_per_byte,
)
from bigasp.train.mixing import build_mix
from bigasp.train.sampler import SamplerState, build_row_buckets, plan_epoch

log = logging.getLogger(__name__)


class StreamStopped(Exception):
    """A stop signal arrived while the run waited for the encoder, at a step boundary (safe to save)."""


def manifest_threshold(dataset, cfg: DataConfig, *, seed: int) -> int:
    """The validation cutoff hash `split_dataset` would choose for the whole ingested manifest."""

    class _Manifest:
        table = dataset.manifest

    return split_dataset(_Manifest, cfg, seed=seed).threshold


def _broadcast(obj: Any, world_size: int) -> Any:
    """Rank 0's `obj` on every rank (the process group the trainer set up)."""
    import torch.distributed as dist

    if world_size > 1 and dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


class _StreamItems:
    """This rank's batches among epoch 0's planned ones, from global position `start` on."""

    def __init__(self, loader: StreamingLoader, positions: np.ndarray):
        self.loader, self.positions = loader, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> BatchItem:
        p = int(self.positions[i])
        rows, chunks = self.loader.batch_at(p)
        return BatchItem(rows, 0, p, chunks)


class StreamingLoader(TrainLoader):
    """`TrainLoader` whose epoch 0 follows a dataset still being encoded (see the module notes).

    `dataset` must be a `StreamingLatentDataset` (store/streaming.py). `threshold`: the saved
    validation cutoff of a resumed run (default: computed from the manifest). `exchange`: rank
    0's value to every rank (default: a broadcast in the trainer's process group). `check`: run
    on each wave's new shards before they train (the trainer's VAE/scaling preflight).
    """

    def __init__(
        self,
        dataset,
        cfg: DataConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = None,
        device_batch_size: int | None = None,
        threshold: int | None = None,
        exchange: Callable[[Any], Any] | None = None,
        check: Callable[[list[str]], None] | None = None,
    ):
        if not getattr(dataset, "streaming", False):
            raise ValueError("StreamingLoader needs a StreamingLatentDataset")
        if len(dataset) and not dataset.index_files_taken:
            raise ValueError("the streaming dataset must start empty (rows are taken in by waves)")
        self._init_position(dataset, cfg, rank, world_size, seed, device_batch_size)
        self.exchange = exchange or (lambda obj: _broadcast(obj, world_size))
        self.check = check  # called with each wave's new shard names (VAE identity, scaling)
        self._checked: set[str] = set()
        self.threshold = (
            manifest_threshold(dataset, cfg, seed=self.seed) if threshold is None else int(threshold)
        )
        self.buckets = None  # the whole dataset's, once the pass is over
        self.mix = None
        # per row, appended wave by wave
        n = dataset.n_images  # at most one row per ingested image: preallocated, never regrown
        self._per_row = {
            "tokens": Grow(np.int32, n),
            "chunks": Grow(np.int8, n),
            "hash": Grow(np.uint64, n),
            "usable": Grow(bool, n),
            "bh": Grow(np.int32, n),
            "bw": Grow(np.int32, n),
        }
        # epoch 0's planned batches, wave by wave
        self.waves: list[list[str]] = []
        self.done = False
        self._batch_rows: list[np.ndarray] = []  # per wave [n, b] int64
        self._batch_chunks: list[np.ndarray] = []  # per wave [n] int
        self._cum = np.zeros(1, np.int64)  # batches planned before each wave
        self._pool = np.zeros(0, np.int64)
        self._split: Split | None = None
        self._tokens_per_byte: float | None = None
        self.waits = 0  # times the loader found nothing new and waited (for logs and tests)
        if cfg.mix.enabled:
            log.info("data.mix applies from epoch 1: the streaming first pass trains each image once")

    @property
    def token_estimates(self) -> np.ndarray:
        """Estimated caption tokens per row taken in (the base class reads it after the pass)."""
        return self._per_row["tokens"].view

    @token_estimates.setter
    def token_estimates(self, _value) -> None:
        raise AttributeError("a streaming loader's token estimates follow the rows taken in")

    # -- the pass -------------------------------------------------------------------------------
    @property
    def planned(self) -> int:
        """Batches of epoch 0 planned so far."""
        return int(self._cum[-1])

    def batch_at(self, p: int) -> tuple[np.ndarray, int]:
        w = int(np.searchsorted(self._cum, p, side="right")) - 1
        j = p - int(self._cum[w])
        return self._batch_rows[w][j], int(self._batch_chunks[w][j])

    def take_wave(self, names: Sequence[str]) -> int:
        """Take in index files `names` as the next wave and plan it; returns batches planned."""
        cfg, seed = self.cfg, self.seed
        fresh = [n for n in self.dataset.shards_in(list(names)) if n not in self._checked]
        if self.check is not None and fresh:  # refused shards are neither taken in nor recorded
            self.check(fresh)
        self._checked.update(fresh)
        rows = self.dataset.grow(list(names))
        self.waves.append(list(names))
        wave = len(self.waves)
        if len(rows):
            tbl = self.dataset.table.slice(int(rows[0]), len(rows))
            est = row_token_estimates(tbl, cfg.prompt, self._calibrate(tbl))
            chunks = row_chunk_estimates(tbl, cfg, est) if cfg.chunk_bucketing else np.zeros(len(rows))
            hashes = id_hashes(tbl.column("id"), seed=seed)
            usable = np.ones(len(rows), bool)
            if cfg.exclude_score_zero and "score" in tbl.column_names:
                usable = pc.fill_null(tbl.column("score"), -1).to_numpy(zero_copy_only=False) != 0
            col = lambda name: tbl.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
            for name, values in (("tokens", est), ("chunks", chunks), ("hash", hashes), ("usable", usable),
                                 ("bh", col("bucket_height")), ("bw", col("bucket_width"))):  # fmt: skip
                self._per_row[name].append(values)
            held = hashes <= np.uint64(self.threshold) if self.threshold >= 0 else np.zeros(len(rows), bool)
            self._pool = np.concatenate([self._pool, rows[usable & ~held]])
            self._split = None
        pool, b = self._pool, self.device_batch_size
        bh, bw, chunks = (self._per_row[k].view for k in ("bh", "bw", "chunks"))
        buckets = build_row_buckets(pool, bh[pool], bw[pool], chunks[pool])
        plan = plan_epoch(buckets, seed=seed, epoch=0, device_batch_size=b, wave=wave)
        at = plan.batch_starts[:, None] + np.arange(b, dtype=np.int64)
        taken = np.zeros(len(plan.order), bool)
        taken[at.ravel()] = True
        self._pool = np.sort(plan.order[~taken])
        self._batch_rows.append(plan.order[at])
        self._batch_chunks.append(buckets.bucket_chunks[plan.batch_bucket].astype(np.int64))
        self._cum = np.append(self._cum, self._cum[-1] + plan.n_batches)
        log.info(
            "streaming wave %d: %d index file(s), %d new image(s) (%d rows in all), %d batch(es) planned; "
            "%d image(s) wait in the pool for a full batch",
            wave,
            len(names),
            len(rows),
            len(self.dataset),
            plan.n_batches,
            len(self._pool),
        )
        return plan.n_batches

    def _calibrate(self, tbl) -> float | None:
        """Tokens per caption byte: measured on each wave until one holds a full calibration
        sample, then fixed (tokenising a sample per one-shard wave would add up over thousands)."""
        if self._tokens_per_byte is not None or "captions" not in tbl.column_names:
            return self._tokens_per_byte
        flat = pc.list_flatten(tbl.column("captions").combine_chunks())
        ratio = tokens_per_byte(flat)
        if len(flat) >= CALIBRATION_SAMPLE:
            self._tokens_per_byte = ratio
        return ratio

    def _look(self, last_new: float) -> tuple:
        """Rank 0's decision: ("wave", files) | ("done",) | ("wait", missing) | ("stop",) | ("timeout", missing)."""
        taken = set(self.dataset.index_files_taken)
        new = [f for f in self.dataset.published_index_files() if f not in taken]
        if new:
            return ("wave", new)
        missing = self.dataset.missing_latents()
        if missing == 0:
            return ("done",)
        if self.interruptible and self.stop_check is not None and self.stop_check():
            return ("stop",)
        limit = self.cfg.stream_timeout_s
        if limit and time.monotonic() - last_new > limit:
            return ("timeout", missing)
        return ("wait", missing)

    def _next_wave(self) -> None:
        """Plan more of epoch 0, waiting for the encoder if nothing new is published (collective)."""
        start = time.monotonic()
        logged = False
        while True:
            decision = self.exchange(self._look(start) if self.rank == 0 else None)
            kind = decision[0]
            if kind == "wave":
                if logged:
                    log.info("new shards after %.0f s of waiting", time.monotonic() - start)
                self.take_wave(decision[1])
                return
            if kind == "done":
                self.done = True
                log.info(
                    "streaming pass complete: %d image(s) taken in over %d wave(s), %d batch(es); %d image(s) "
                    "left in the pool are dropped this epoch",
                    len(self.dataset),
                    len(self.waves),
                    self.planned,
                    len(self._pool),
                )
                return
            if kind == "stop":
                raise StreamStopped("stopped by a signal while waiting for the encoder")
            if kind == "timeout":
                raise DataError(
                    f"{self.dataset.root_url}: no new shard for {self.cfg.stream_timeout_s:.0f} s while "
                    f"{decision[1]} ingested image(s) still have no latent: is `bigasp encode` still running? "
                    "Restart it (it resumes), then resume this run; or raise data.stream_timeout_s (0 = wait forever)"
                )
            self.waits += 1
            if not logged:
                log.info(
                    "waiting for the encoder: %d ingested image(s) have no latent yet (%d taken in); "
                    "polling every %g s",
                    decision[1],
                    len(self.dataset),
                    self.cfg.stream_poll_s,
                )
                logged = True
            time.sleep(self.cfg.stream_poll_s)

    def _finish(self) -> None:
        """After the pass: the whole dataset (rows in the order taken in) for epochs 1, 2, ..."""
        self.dataset.compact()
        train = self.split.train
        bh, bw, chunks = (self._per_row[k].view for k in ("bh", "bw", "chunks"))
        self.buckets = build_row_buckets(
            train, bh[train], bw[train], chunks[train] if self.cfg.chunk_bucketing else None
        )
        self.mix = build_mix(self.dataset.table, self.buckets, self.cfg.mix)
        self._report_buckets()

    # -- split ----------------------------------------------------------------------------------
    @property
    def split(self) -> Split:
        """Validation / stable / train rows among the images taken in so far (fixed cutoff)."""
        if self._split is None:
            hashes, usable = self._per_row["hash"].view, self._per_row["usable"].view
            rows = np.arange(len(hashes), dtype=np.int64)
            held = hashes <= np.uint64(self.threshold) if self.threshold >= 0 else np.zeros(len(rows), bool)
            train = rows[usable & ~held]
            ranked = train[np.argsort(hashes[train], kind="stable")]
            self._split = Split(
                train=train,
                validation=rows[usable & held],
                stable=np.sort(ranked[: min(self.cfg.stable_size, len(train))]),
                excluded=int((~usable).sum()),
                threshold=self.threshold,
            )
        return self._split

    @split.setter
    def split(self, value) -> None:  # TrainLoader.__init__ is not run; nothing else assigns it
        raise AttributeError("a streaming loader's split follows the rows taken in")

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        w = self.world_size
        while self.epoch == 0 and not self.done:
            if self.planned - self.position < w:
                self._next_wave()
                continue
            steps = (self.planned - self.position) // w
            positions = self.position + self.rank + w * np.arange(steps, dtype=np.int64)
            yield from self._run(_StreamItems(self, positions), 1)
        if self.epoch == 0:
            self._finish()
            self.epoch, self.position = 1, 0
        yield from super().__iter__()

    def batches_per_epoch(self) -> int:
        return self.planned // self.world_size if self.epoch == 0 else super().batches_per_epoch()

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.epoch == 0:
            state = SamplerState(
                epoch=0,
                position=self.position,
                device_batch_size=self.device_batch_size,
                world_size=self.world_size,
                seed=self.seed,
                n_rows=-1,
            ).to_dict() | {"variant_generations": None}
        else:
            state = super().state_dict()
        return state | {
            "stream": {"waves": [list(w) for w in self.waves], "done": self.done, "threshold": self.threshold}
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stream = state.get("stream")
        if stream is None:
            raise DataError(
                "the checkpoint's loader state is not from a streaming run; resume it with data.stream = false"
            )
        if self.waves:
            raise RuntimeError("load_state_dict needs a fresh StreamingLoader")
        st = SamplerState.from_dict(state)
        if st.seed != self.seed:
            raise ConfigError(
                f"loader state was saved with seed {st.seed} but this run uses seed {self.seed}; "
                "resume with the same data.seed (the epoch order and prompts depend on it)"
            )
        if not stream.get("done") and st.device_batch_size != self.device_batch_size:
            raise ConfigError(
                f"data.device_batch_size changed {st.device_batch_size} -> {self.device_batch_size} during the "
                "streaming first pass, whose batches are planned wave by wave: resume with "
                f"device_batch_size = {st.device_batch_size} until epoch 1"
            )
        self.threshold = int(stream["threshold"])
        self._split = None
        saved_b, self.device_batch_size = self.device_batch_size, st.device_batch_size
        for names in stream["waves"]:
            self.take_wave(names)
        self.device_batch_size = saved_b
        self.done = bool(stream["done"])
        if st.epoch == 0:
            self.epoch, self.position = 0, st.position
            if self.done:  # saved at the very end of the pass
                self._finish()
                self.epoch, self.position = 1, 0
            return
        if not self.done:
            raise DataError(
                "the checkpoint's loader state is past epoch 0 but its streaming pass is not complete"
            )
        self._finish()
        new = [
            f for f in self.dataset.published_index_files() if f not in set(self.dataset.index_files_taken)
        ]
        if new:
            log.warning(
                "%d index file(s) were published after this run's streaming pass ended; their images are not "
                "part of this run (start a new run to train on them)",
                len(new),
            )
        super().load_state_dict(state)
