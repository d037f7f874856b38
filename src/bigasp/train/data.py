"""Training batches: config, the `Batch` the trainer consumes, collate, split, loaders.

The loader hands out *whole batches* from a map-style dataset over this rank's planned
batch list (`batch_size=None`), so a worker builds one batch end to end (read latents,
synthesise prompts, tokenise, collate). DataLoader returns items in index order whatever
the worker count, and every random choice is keyed by `(seed, epoch, row)`, so the stream
is identical for `num_workers` 0 or 16 and after any resume. Sampler semantics live in
`bigasp.train.sampler`; docs/data-loading.md explains both.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import Field

from bigasp.config import Section
from bigasp.errors import BigaspError, ConfigError, DataError
from bigasp.text import CHUNK_CONTENT, chunk_batch, tokenize
from bigasp.text.aliases import AliasTable
from bigasp.text.synthesis import (
    EVAL_EPOCH,
    PromptConfig,
    SampleMeta,
    expected_quality_tokens,
    synthesize,
)
from bigasp.train.datasets import DatasetEntry
from bigasp.train.mixing import COPY_SHIFT, ROW_MASK, MixConfig, build_mix
from bigasp.train.sampler import (
    EpochPlan,
    SamplerState,
    build_row_buckets,
    chunk_estimates,
    eval_plan,
    plan_epoch,
    resume_position,
)

log = logging.getLogger(__name__)


class DataConfig(Section):
    """`[data]`: where training data comes from and how batches are formed."""

    dataset: str | list[str | DatasetEntry] = Field(
        "",
        description="Dataset directory (or fsspec URL) written by `bigasp encode`, or a list of them to train "
        "on several at once (rows in list order); an item may be a table {path, name, storage_options}. "
        "See bigasp.train.datasets.",
    )
    seed: int = Field(
        42, description="Run seed: split, epoch order and prompts all derive from it (bigASP: 42)."
    )
    device_batch_size: int = Field(4, ge=1, description="Samples per rank per micro-step.")
    num_workers: int = Field(
        2,
        ge=0,
        description="DataLoader worker processes per rank (0 = main process). `bigasp train` picks a count for "
        "the machine unless this is set (GPU: up to 4, leaving 2 cores; CPU: 0 or 1) and says so at start-up; "
        "2 is the value for code that builds a loader directly.",
    )
    prefetch_factor: int = Field(2, ge=1, description="Batches each worker prepares ahead (num_workers > 0).")
    pin_memory: bool = Field(
        True, description="Pin batches in page-locked memory (only when CUDA is available)."
    )
    max_chunks: int = Field(
        3, ge=1, description="Max 75-token chunks per prompt; longer ones are truncated (bigASP: 3)."
    )
    chunk_bucketing: bool = Field(
        True,
        description="Bucket by estimated chunk count as well as resolution (bigASP v2), so batches pad less.",
    )
    quality_tokens: float | None = Field(
        None,
        ge=0.0,
        description="Tokens the quality element adds, for chunk estimates. None = expected value from [data.prompt] "
        "(bigASP assumed 5).",
    )
    validation_size: int = Field(
        2048, ge=0, description="Held-out validation images (bigASP: 2048); capped at 10% of a small dataset."
    )
    stable_size: int = Field(
        2048, ge=0, description="Training images in the fixed 'stable train loss' set (bigASP: first 2048)."
    )
    exclude_score_zero: bool = Field(True, description="Drop images with score 0 before splitting (bigASP).")
    check_vae: bool = Field(
        True,
        description="Refuse to train when the dataset's latents were made by a VAE with other weights than the "
        "model's (recorded per shard by `bigasp encode`). Set false for a compatible variant, e.g. the SDXL "
        "fp16-fix VAE. A different scaling factor is always an error. With several datasets, also whether they "
        "may differ in VAE among themselves.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for a dataset on object storage (s3://...), e.g. {endpoint_url = ..., "
        "key = ..., secret = ...}; empty = credentials from the usual AWS_* variables (or ~/.aws). Applies to "
        "every dataset of a list that sets no storage_options of its own.",
    )
    cache_dir: str = Field(
        "",
        description="Local disk cache of latents read from object storage; empty = $BIGASP_CACHE_DIR or "
        "~/.cache/bigasp/latents. Unused for a local dataset.",
    )
    cache_gb: float = Field(
        50.0,
        ge=0,
        description="Size limit of that cache in GiB; least recently used latents are evicted. Several datasets "
        "on object storage share it equally.",
    )
    prefetch_batches: int = Field(
        64,
        ge=0,
        description="Object storage: batches of this rank's planned order fetched ahead into the cache "
        "(concurrent ranged reads); 0 = fetch on demand only.",
    )
    read_concurrency: int = Field(32, ge=1, description="Object storage: ranged reads in flight at once.")
    refresh_variants: bool = Field(
        True,
        description="At each epoch start, re-read the latent index and train on the variant generations "
        "complete by then (an encoder may keep adding them); recorded in the checkpoint for exact resume.",
    )
    allow_partial: bool = Field(
        False,
        description="Train although some ingested images have no latent yet (an unfinished `bigasp encode`, or a "
        "shard whose index file is lost): only the images that have one train. Off: training refuses to start "
        "and says how many are missing.",
    )
    stream: bool = Field(
        False,
        description="Start training while `bigasp encode` is still writing this dataset: the first pass (epoch 0) "
        "trains on shards as they are published, in recorded waves, and waits when it runs ahead of the "
        "encoder; from epoch 1 the whole dataset is planned as usual (see docs/training.md).",
    )
    stream_poll_s: float = Field(
        10.0,
        gt=0,
        description="Streaming: seconds between looks for new shards while waiting on the encoder.",
    )
    stream_timeout_s: float = Field(
        3600.0,
        ge=0,
        description="Streaming: stop with an error after this many seconds of waiting without a new shard "
        "while images still lack latents (a dead encoder); 0 = wait forever.",
    )
    read_retries: int = Field(
        3, ge=0, description="Object storage: re-fetches of a missing or corrupt record before the error."
    )
    prompt: PromptConfig = Field(
        default_factory=PromptConfig, description="Prompt synthesis ([data.prompt])."
    )
    mix: MixConfig = Field(
        default_factory=MixConfig, description="Per-source/folder/dataset weights or repeats ([data.mix])."
    )


@dataclass
class Batch:
    """One device batch; every sample shares the latent bucket and the chunk count `n`."""

    latents: torch.Tensor  # [B,4,h,w] float16
    te1_ids: torch.Tensor  # [B,n,77] int64
    te2_ids: torch.Tensor  # [B,n,77] int64
    original_size: torch.Tensor  # [B,2] (height, width)
    crop: torch.Tensor  # [B,2] (top, left)
    target_size: torch.Tensor  # [B,2] (height, width) = bucket size in pixels
    prompts: list[str]
    indices: torch.Tensor  # [B] row indices into LatentDataset.table
    n_tokens: torch.Tensor | None = None  # [B] content tokens per prompt, before truncation
    n_truncated: int = 0  # prompts cut to max_chunks
    chunk_estimate: int = 0  # the sampler's chunk-count estimate for this batch (0 = none)
    epoch: int = -1  # epoch and global batch position this batch came from (-1 = eval)
    position: int = -1
    copies: torch.Tensor | None = None  # [B] copy number of each row in its epoch ([data.mix]; None = all 0)

    def _map(self, fn) -> Batch:
        changes = {f.name: fn(getattr(self, f.name)) for f in fields(self)}
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **changes)

    def pin_memory(self) -> Batch:
        return self._map(lambda v: v.pin_memory() if isinstance(v, torch.Tensor) else None)

    def to(self, device, non_blocking: bool = False) -> Batch:
        return self._map(
            lambda v: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else None
        )

    def __len__(self) -> int:
        return int(self.latents.shape[0])


@dataclass
class Sample:
    """One read + synthesised item before collation."""

    index: int
    latent: torch.Tensor
    prompt: str
    original_size: tuple[int, int]
    crop: tuple[int, int]
    target_size: tuple[int, int]


def collate(
    samples: Sequence[Sample],
    *,
    max_chunks: int = 3,
    token_ids: Sequence[Sequence[int]] | None = None,
    chunk_estimate: int = 0,
    epoch: int = -1,
    position: int = -1,
) -> Batch:
    """Stack samples into a `Batch`; prompts are tokenised (unless `token_ids` given) and chunked.

    The batch pads to its own longest prompt (at most `max_chunks`), as bigASP did.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    shapes = {tuple(s.latent.shape) for s in samples}
    if len(shapes) != 1:
        raise DataError(
            f"latents in one batch differ in shape {sorted(shapes)}: the bucket columns disagree "
            "with the stored latents; run `bigasp dataset info` / verify the dataset"
        )
    ids = list(token_ids) if token_ids is not None else tokenize([s.prompt for s in samples])
    chunks = chunk_batch(ids, max_chunks=max_chunks, warn=False)
    return Batch(
        latents=torch.stack([s.latent for s in samples]).to(torch.float16),
        te1_ids=chunks.te1,
        te2_ids=chunks.te2,
        original_size=torch.tensor([s.original_size for s in samples], dtype=torch.long),
        crop=torch.tensor([s.crop for s in samples], dtype=torch.long),
        target_size=torch.tensor([s.target_size for s in samples], dtype=torch.long),
        prompts=[s.prompt for s in samples],
        indices=torch.tensor([s.index for s in samples], dtype=torch.long),
        n_tokens=torch.tensor(chunks.n_tokens, dtype=torch.long),
        n_truncated=chunks.n_truncated,
        chunk_estimate=chunk_estimate,
        epoch=epoch,
        position=position,
    )


# ---------------------------------------------------------------------------------------------
# Per-row estimates (vectorised over the whole table; no per-row Python objects)


CALIBRATION_SAMPLE = 2048  # captions tokenised to calibrate the bytes -> tokens ratio


def tokens_per_byte(texts: pa.Array, sample: int = CALIBRATION_SAMPLE) -> float:
    """CLIP tokens per UTF-8 byte, measured with the real tokenizer on a fixed sample of `texts`."""
    from bigasp.text import tokenize

    n = len(texts)
    if n == 0:
        return 0.25
    idx = np.sort(np.random.default_rng(0).choice(n, min(sample, n), replace=False))
    picked = [t for t in texts.take(pa.array(idx, pa.int64())).to_pylist() if t]
    n_bytes = sum(len(t.encode("utf-8")) for t in picked)
    if n_bytes == 0:
        return 0.25
    return sum(len(ids) for ids in tokenize(picked)) / n_bytes


def row_token_estimates(table: pa.Table, prompt: PromptConfig, ratio: float | None = None) -> np.ndarray:
    """Estimated content tokens of each row's prompt, int32, without tokenising every row.

    Uses an `n_tokens` column when the dataset has one (int, or list = per caption, averaged);
    rows with no value there (null, or a list of nulls) are estimated as if the column were
    absent, so a tag-only row lacking a count is not taken for an empty prompt. Otherwise: each caption's UTF-8 byte length (free: Arrow offsets) times the dataset's
    tokens-per-byte ratio, calibrated by tokenising a fixed sample of 2048 captions, averaged
    over the row's captions. Tokenising or regex-scanning 13M captions would take minutes; the
    per-row error only shifts prompts near a 75-token boundary, and the loader and
    `bigasp dataset batches` report how often the estimate misses. Rows without a caption get
    a tag prompt of about min(#tags, tag_count_mean) tags at `tokens_per_tag` each. `ratio`:
    a tokens-per-byte ratio calibrated before (the streaming pass calibrates once).
    """
    n = len(table)
    names = table.column_names
    if "n_tokens" in names:
        col = table.column("n_tokens").combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            flat = pc.list_flatten(col)
            valid = pc.is_valid(flat).to_numpy(zero_copy_only=False).astype(np.float64)
            values = pc.fill_null(flat, 0).to_numpy(zero_copy_only=False).astype(np.float64)
            owner = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
            known_n = np.bincount(owner, weights=valid, minlength=n)
            sums = np.bincount(owner, weights=values * valid, minlength=n)
            own = np.rint(sums / np.maximum(known_n, 1)).astype(np.int32)
            known = known_n > 0
        else:
            own = pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(np.int32)
            known = pc.is_valid(col).to_numpy(zero_copy_only=False)
        if known.all():
            return own
        rest = row_token_estimates(table.drop_columns(["n_tokens"]), prompt, ratio)
        return np.where(known, own, rest).astype(np.int32)
    est = np.zeros(n, dtype=np.float64)
    has_caption = np.zeros(n, dtype=bool)
    if "captions" in names and n:
        caps = table.column("captions").combine_chunks()
        flat = pc.list_flatten(caps)
        n_bytes = pc.fill_null(pc.binary_length(flat), 0).to_numpy(zero_copy_only=False).astype(np.float64)
        est = _list_mean(caps, n_bytes * (tokens_per_byte(flat) if ratio is None else ratio)).astype(
            np.float64
        )
        has_caption = pc.fill_null(pc.list_value_length(caps), 0).to_numpy(zero_copy_only=False) > 0
    if "tags" in names and n and not has_caption.all():
        n_tags = pc.fill_null(pc.list_value_length(table.column("tags").combine_chunks()), 0)
        n_tags = n_tags.to_numpy(zero_copy_only=False).astype(np.float64)
        tag_est = np.minimum(n_tags, prompt.tag_count_mean) * prompt.tokens_per_tag
        est = np.where(has_caption, est, tag_est)
    return np.rint(est).astype(np.int32)


def _list_mean(lists: pa.Array, values: np.ndarray) -> np.ndarray:
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    sums = np.bincount(owner, weights=values, minlength=len(lengths))
    return np.rint(sums / np.maximum(lengths, 1)).astype(np.int32)


def row_chunk_estimates(
    table: pa.Table, cfg: DataConfig, token_estimates: np.ndarray | None = None
) -> np.ndarray:
    """Estimated chunk count (1..max_chunks) of every row: caption tokens + expected quality tokens."""
    tokens = row_token_estimates(table, cfg.prompt) if token_estimates is None else token_estimates
    q = cfg.quality_tokens if cfg.quality_tokens is not None else expected_quality_tokens(cfg.prompt)
    return chunk_estimates(tokens, q, cfg.max_chunks)


# ---------------------------------------------------------------------------------------------
# Validation / stable split


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # int64 row indices, ascending
    validation: np.ndarray  # int64 row indices, ascending; never trained on
    stable: np.ndarray  # int64: the `stable_size` train rows with the smallest id hashes
    excluded: int = 0  # rows dropped before splitting (score 0)
    # An image is held out iff its id hash is <= this cutoff (-1 = none). Checkpoints keep it, so a
    # resumed run on a grown dataset keeps every old image on its side and assigns new ones alike.
    threshold: int = -1


def id_hashes(ids: pa.Array | Sequence[str], *, seed: int, chunk: int = 1 << 16) -> np.ndarray:
    """uint64 BLAKE2b hash of each image id, salted with the run seed: where the id falls in the split.

    A function of (seed, id) only, never of the row position, so adding or removing other images
    does not change it. The seed goes in as BLAKE2b's salt (no extra key block: ~2x faster than a
    keyed hash, ~0.6 us per id). Arrow input is converted a chunk at a time, so 13M ids never
    exist as Python objects at once.
    """
    salt = struct.pack("<q", int(seed))
    ids = ids if isinstance(ids, pa.Array | pa.ChunkedArray) else pa.array(list(ids), pa.string())
    ids = ids.cast(pa.binary())
    out = np.empty(len(ids), dtype=np.uint64)
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes
    for start in range(0, len(ids), chunk):
        part = ids.slice(start, chunk).to_pylist()
        out[start : start + len(part)] = [
            from_bytes(blake2b(i, digest_size=8, salt=salt, person=b"bigasp-split").digest(), "little")
            for i in part
        ]
    return out


def split_dataset(dataset, cfg: DataConfig, *, seed: int, threshold: int | None = None) -> Split:
    """Held-out validation rows and the fixed 'stable train loss' rows, decided by image id.

    Each usable image gets a hash of (seed, id). The `validation_size` smallest hashes are held
    out (bigASP held out 2048 images); the cutoff hash is `Split.threshold`. With `threshold`
    given (from a checkpoint) an image is held out iff its hash is <= it, so images present
    before keep their side whatever was added since. The stable set is the `stable_size` train
    images with the next-smallest hashes.
    """
    table = dataset.table
    n = len(table)
    rows = np.arange(n, dtype=np.int64)
    excluded = 0
    if cfg.exclude_score_zero and "score" in table.column_names:
        score = pc.fill_null(table.column("score"), -1).to_numpy(zero_copy_only=False)
        keep = score != 0
        excluded = int(n - keep.sum())
        rows = rows[keep]
        if excluded:
            log.info("excluded %d image(s) with score 0 from training and validation", excluded)
    if "id" not in table.column_names:
        raise DataError("the dataset table has no 'id' column, which the validation split is keyed by")
    hashes = id_hashes(table.column("id").take(pa.array(rows, pa.int64())), seed=seed)
    order = np.argsort(hashes, kind="stable")
    if threshold is None:
        n_val = min(cfg.validation_size, len(rows) // 10)
        if n_val < cfg.validation_size:
            log.warning(
                "validation set capped at %d image(s) (10%% of %d usable) instead of data.validation_size=%d",
                n_val,
                len(rows),
                cfg.validation_size,
            )
        threshold = int(hashes[order[n_val - 1]]) if n_val > 0 else -1
    held = hashes <= np.uint64(threshold) if threshold >= 0 else np.zeros(len(rows), dtype=bool)
    validation = rows[held]
    train = rows[~held]
    ranked_train = rows[order][~held[order]]
    stable = ranked_train[: min(cfg.stable_size, len(train))]
    return Split(train=train, validation=validation, stable=stable, excluded=excluded, threshold=threshold)


# ---------------------------------------------------------------------------------------------
# Building one batch (runs in a DataLoader worker)


def _conditioning_columns(table: pa.Table) -> list[str]:
    want = [
        "captions",
        "tags",
        "score",
        "source",
        "watermark",
        "extra",
        "original_height",
        "original_width",
        "crop_top",
        "crop_left",
        "bucket_height",
        "bucket_width",
    ]
    names = set(table.column_names)
    if "n_tokens" in names:
        want.append("n_tokens")
    return [c for c in want if c in names]


def synthesize_rows(
    table: pa.Table,
    rows: np.ndarray,
    *,
    seed: int,
    epoch: int,
    cfg: DataConfig,
    aliases: AliasTable | None = None,
    token_estimates: np.ndarray | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Training prompts of `rows` under keys `(seed, epoch, row)`, plus the rows' metadata dicts."""
    sub = table.select(_conditioning_columns(table)).take(pa.array(rows, pa.int64())).to_pylist()
    prompts = []
    for row_idx, row in zip(np.asarray(rows).tolist(), sub, strict=True):
        n_tok = int(token_estimates[row_idx]) if token_estimates is not None else None
        meta = SampleMeta.from_row(row_idx, row, n_tokens=n_tok)
        prompts.append(synthesize(meta, cfg.prompt, (seed, epoch, row_idx), aliases))
    return prompts, sub


def pick_variants(n_variants: np.ndarray, rows: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
    """Which stored latent variant each row trains on in `epoch`: `(k + epoch) mod n`, with `k` a
    hash of `(seed, row)`. A row with n variants cycles through all of them in n epochs, so
    consecutive epochs never repeat a crop/sample, and the choice is a pure function of
    `(seed, epoch, row, n)`: resume and any worker count give the same one. Evaluation
    (`EVAL_EPOCH`) always uses variant 0, so validation losses stay comparable."""
    n = np.asarray(n_variants, dtype=np.int64)
    if epoch == EVAL_EPOCH or (n <= 1).all():
        return np.zeros(len(n), dtype=np.int64)
    k = np.array(
        [
            int.from_bytes(
                hashlib.blake2b(f"{seed}:{int(r)}:variant".encode(), digest_size=8).digest(), "little"
            )
            for r in np.asarray(rows).tolist()
        ],
        dtype=np.uint64,
    )
    return ((k % np.uint64(1 << 32)).astype(np.int64) + epoch) % np.maximum(n, 1)


def row_variants(dataset, rows: np.ndarray, *, seed: int, epoch: int, generations: int | None) -> np.ndarray:
    """The variant each of `rows` trains on in `epoch`, using at most `generations` variants per
    image (None = all it has); 0 for a dataset view without variants."""
    n_var = getattr(dataset, "n_variants", None)
    if n_var is None:
        return np.zeros(len(rows), np.int64)
    n = n_var[rows] if generations is None else np.minimum(n_var[rows], generations)
    return pick_variants(n, rows, seed=seed, epoch=epoch)


def batch_records(dataset, rows: np.ndarray, *, seed: int, epoch: int, generations: int | None) -> np.ndarray:
    """Record indices (`LatentDataset.rec`) that `build_batch` reads for `rows` in `epoch`."""
    var = row_variants(dataset, rows, seed=seed, epoch=epoch, generations=generations)
    return np.array([dataset.rec(int(r), int(v)) for r, v in zip(rows, var, strict=True)], dtype=np.int64)


def build_batch(
    dataset,
    rows: np.ndarray,
    *,
    seed: int,
    epoch: int,
    cfg: DataConfig,
    aliases: AliasTable | None = None,
    token_estimates: np.ndarray | None = None,
    chunk_estimate: int = 0,
    position: int = -1,
    generations: int | None = None,
    copies: np.ndarray | None = None,
) -> Batch:
    """Read, synthesise (key `(seed, epoch, row)`), tokenise and collate the given rows; each row's
    latent variant is `row_variants(...)` (at most `generations` per image; None = all)."""
    prompts, sub = synthesize_rows(
        dataset.table, rows, seed=seed, epoch=epoch, cfg=cfg, aliases=aliases, token_estimates=token_estimates
    )
    variants = row_variants(dataset, np.asarray(rows), seed=seed, epoch=epoch, generations=generations)
    samples = [
        Sample(
            index=row_idx,
            latent=dataset.read_latent(row_idx, int(v)) if v else dataset.read_latent(row_idx),
            prompt=prompt,
            original_size=(int(row["original_height"]), int(row["original_width"])),
            crop=dataset.crop_of(row_idx, int(v)) if v else (int(row["crop_top"]), int(row["crop_left"])),
            target_size=(int(row["bucket_height"]), int(row["bucket_width"])),
        )
        for row_idx, prompt, row, v in zip(np.asarray(rows).tolist(), prompts, sub, variants, strict=True)
    ]
    batch = collate(
        samples, max_chunks=cfg.max_chunks, chunk_estimate=chunk_estimate, epoch=epoch, position=position
    )
    if copies is not None and copies.any():
        batch.copies = torch.from_numpy(np.asarray(copies, dtype=np.int64))
    return batch


@dataclass(frozen=True)
class BatchItem:
    rows: np.ndarray
    epoch: int
    position: int
    chunk_estimate: int
    copies: np.ndarray | None = None


class _PlanItems:
    """This rank's batches of an epoch as a lazy sequence of `BatchItem`s.

    Holds three arrays instead of one Python object per batch: at 13M rows, world size 1 and
    device batch 4, a list would be 3M objects and ~1 GB.
    """

    def __init__(self, plan: EpochPlan, positions: np.ndarray, bucket_chunks: np.ndarray):
        self.order = plan.order
        self.batch_size = plan.device_batch_size
        self.epoch = plan.epoch
        self.positions = positions
        self.starts = plan.batch_starts[positions]
        self.chunks = bucket_chunks[plan.batch_bucket[positions]]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> BatchItem:
        s = int(self.starts[i])
        rows = self.order[s : s + self.batch_size]
        return BatchItem(
            rows & ROW_MASK, self.epoch, int(self.positions[i]), int(self.chunks[i]), rows >> COPY_SHIFT
        )


class _BatchSource(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches; deterministic per item."""

    def __init__(
        self,
        dataset,
        cfg: DataConfig,
        seed: int,
        aliases,
        token_estimates,
        items: Sequence[BatchItem],
        generations: int | None = None,
    ):
        self.generations = generations
        self.dataset = dataset
        self.cfg = cfg
        self.seed = seed
        self.aliases = aliases
        self.token_estimates = token_estimates
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Batch | WorkerFailure:
        it = self.items[i]
        try:
            return build_batch(
                self.dataset,
                it.rows,
                seed=self.seed,
                epoch=it.epoch,
                cfg=self.cfg,
                aliases=self.aliases,
                token_estimates=self.token_estimates,
                chunk_estimate=it.chunk_estimate,
                position=it.position,
                generations=self.generations,
                copies=it.copies,
            )
        except BigaspError as err:  # a data problem, not a bug: hand it back whole, not as a traceback
            return WorkerFailure(err)


@dataclass
class WorkerFailure:
    """A user-fixable error raised while building a batch, returned instead of raised.

    DataLoader re-raises a worker's exception as a new one whose message is the worker's whole
    traceback; returned as a value, the main process raises the original one-line error."""

    error: BigaspError


def _iterate(source: _BatchSource, cfg: DataConfig, on_start=None) -> Iterator[Batch]:
    """Batches of `source` in order; the worker processes are shut down and reaped whenever
    iteration ends: exhausted, failed, closed, or the consumer raised.

    Left to garbage collection, a failed run's workers stay referenced by the traceback until
    interpreter exit, where multiprocessing SIGTERMs them (which they ignore, see
    `_worker_init`) and waits forever."""
    it = iter(_loader(source, cfg))
    if on_start is not None:  # after the workers are forked: no thread of ours is copied into them
        on_start()
    try:
        for item in it:
            if isinstance(item, WorkerFailure):
                raise item.error
            yield item
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's own orderly worker shutdown
        if shutdown is not None:
            shutdown()
            for w in getattr(it, "_workers", []):
                if w.is_alive():  # missed the shutdown and ignores SIGTERM (see _worker_init)
                    w.kill()
                    w.join(timeout=10)


def _loader(source: _BatchSource, cfg: DataConfig) -> torch.utils.data.DataLoader:
    global _MAIN_PID, _PRCTL
    _MAIN_PID = os.getpid()
    if _PRCTL is None:
        _PRCTL = _find_prctl()
    workers = cfg.num_workers
    return torch.utils.data.DataLoader(
        source,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=_worker_init if workers > 0 else None,
    )


def _worker_init(_: int) -> None:
    # Tokenisation and decompression are per-batch work; one thread per worker avoids
    # oversubscribing the cores that the other workers and the trainer use.
    torch.set_num_threads(1)
    # Ctrl-C and SLURM/Kubernetes preemption signal the whole process group. A worker killed by
    # it makes the trainer's next batch fetch fail before it can write the preemption
    # checkpoint; ignoring the signal here lets the main process (which handles it) finish the
    # step, save, and shut the workers down itself. Workers still exit if the main process
    # dies (DataLoader's parent watchdog), and SIGKILL still kills them.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A SIGKILLed main process cannot reap its workers: have the kernel kill them with it.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if _MAIN_PID is not None and os.getppid() != _MAIN_PID:  # it died before the prctl took effect
            os._exit(1)


_PR_SET_PDEATHSIG = 1


def _find_prctl():
    """Linux's prctl, resolved in the main process: a forked worker must not search for libraries
    (a subprocess or the loader lock in a child of a threaded process can deadlock it)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_MAIN_PID: int | None = None  # the process that starts the workers (inherited by forked workers)
_PRCTL = None  # see _find_prctl; set with _MAIN_PID when a loader is built


def load_aliases(cfg: DataConfig) -> AliasTable | None:
    if not cfg.prompt.aliases_path or cfg.prompt.alias_prob <= 0:
        return None
    table = AliasTable.load(cfg.prompt.aliases_path)
    s = table.stats
    log.info(
        "tag aliases %s: %d aliases in %d groups (%d active rows, %d inactive, %d self, %d duplicate, %d chained)",
        table.source,
        len(table),
        len(table.groups),
        s.active,
        s.inactive,
        s.self_aliases,
        s.duplicates,
        s.chained,
    )
    return table


# ---------------------------------------------------------------------------------------------
# The training loader


@dataclass
class LoaderStats:
    """Running counts since the loader was built (logged at each epoch end; `dataset batches` reports the same)."""

    batches: int = 0
    samples: int = 0
    chunk_hist: dict[int, int] = field(default_factory=dict)  # padded chunk count per batch
    batch_estimate_mismatch: int = 0  # batches whose padded chunk count != the estimate
    sample_estimate_mismatch: int = 0  # samples whose own chunk count != the batch's estimate
    truncated: int = 0
    dropped_per_epoch: dict[int, int] = field(default_factory=dict)

    def add(self, b: Batch, max_chunks: int) -> None:
        n = int(b.te1_ids.shape[1])
        self.batches += 1
        self.samples += len(b)
        self.chunk_hist[n] = self.chunk_hist.get(n, 0) + 1
        self.truncated += b.n_truncated
        if b.chunk_estimate:
            self.batch_estimate_mismatch += int(n != b.chunk_estimate)
            if b.n_tokens is not None:
                own = np.clip(-(-b.n_tokens.numpy() // CHUNK_CONTENT), 1, max_chunks)
                self.sample_estimate_mismatch += int((own != b.chunk_estimate).sum())


class TrainLoader:
    """Endless iterable of this rank's `Batch`es over the training split, exactly resumable.

    `state_dict()` after consuming k batches on every rank, loaded into a fresh loader, gives
    exactly the batches (rows, latents, prompt text) that batch k+1 onwards of the
    uninterrupted run would have been; see docs/data-loading.md for world-size and
    batch-size changes.
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
        split: Split | None = None,
    ):
        self._init_position(dataset, cfg, rank, world_size, seed, device_batch_size)
        self.split = split if split is not None else split_dataset(dataset, cfg, seed=self.seed)
        table = dataset.table
        self.token_estimates = row_token_estimates(table, cfg.prompt)
        train = self.split.train
        chunks = row_chunk_estimates(table, cfg, self.token_estimates)[train] if cfg.chunk_bucketing else None
        heights = table.column("bucket_height").to_numpy(zero_copy_only=False)[train]
        widths = table.column("bucket_width").to_numpy(zero_copy_only=False)[train]
        self.buckets = build_row_buckets(train, heights, widths, chunks)
        self.mix = build_mix(table, self.buckets, cfg.mix)
        self._report_buckets()

    def _init_position(self, dataset, cfg: DataConfig, rank, world_size, seed, device_batch_size) -> None:
        """Who this loader is (rank, seed, batch size) and where it starts: epoch 0, batch 0."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world size {world_size}")
        self.dataset, self.cfg, self.rank, self.world_size = dataset, cfg, rank, world_size
        self.seed = cfg.seed if seed is None else int(seed)
        self.device_batch_size = (
            cfg.device_batch_size if device_batch_size is None else int(device_batch_size)
        )
        if self.device_batch_size < 1:
            raise ConfigError(f"device_batch_size must be >= 1 (got {self.device_batch_size})")
        self.aliases = load_aliases(cfg)
        self.epoch = 0
        self.position = 0
        self._generations: tuple[int, int | None] | None = None  # (epoch, variant generations it uses)
        self.stats = LoaderStats()
        self._plan: EpochPlan | None = None
        # Only a streaming loader ever waits (for an encoder); the trainer sets these on any loader.
        self.stop_check: Callable[[], bool] | None = None  # stop while waiting?
        self.interruptible = True  # false inside a gradient accumulation (no consistent point to save)

    def _report_buckets(self) -> None:
        b = self.device_batch_size
        counts = self.buckets.counts
        tiny = [k for k in range(len(counts)) if 0 < counts[k] < b]
        if tiny:
            lost = int(counts[tiny].sum())
            log.warning(
                "%d bucket(s) hold fewer than device_batch_size=%d images, so their %d image(s) are never "
                "trained on: %s. Lower device_batch_size, add images, or set data.chunk_bucketing=false.",
                len(tiny),
                b,
                lost,
                ", ".join(f"{self.buckets.describe(k)}={int(counts[k])}" for k in tiny[:20]),
            )
        if (counts // b).sum() < self.world_size:
            raise DataError(
                f"the training split ({int(counts.sum())} images in {len(counts)} buckets) gives "
                f"{int((counts // b).sum())} full batch(es) of {b}, fewer than one per rank ({self.world_size}); "
                "lower device_batch_size or use a larger dataset"
            )

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        epoch, position = self.epoch, self.position
        if position > 0 and self.plan(epoch).steps_from(position, self.world_size) == 0:
            epoch, position = epoch + 1, 0  # the epoch is finished: the next batch is the next epoch's first
        return SamplerState(
            epoch=epoch,
            position=position,
            device_batch_size=self.device_batch_size,
            world_size=self.world_size,
            seed=self.seed,
            n_rows=len(self.buckets.rows),
        ).to_dict() | {
            # the variant generations the epoch in progress trains on (None: decided at its start)
            "variant_generations": self._generations[1]
            if self._generations and self._generations[0] == epoch
            else None
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        st = SamplerState.from_dict(state)
        if st.seed != self.seed:
            raise ConfigError(
                f"loader state was saved with seed {st.seed} but this run uses seed {self.seed}; "
                "resume with the same data.seed (the epoch order and prompts depend on it)"
            )
        if st.n_rows not in (-1, len(self.buckets.rows)):
            log.warning(
                "the training split had %d rows when the state was saved and has %d now: the dataset changed, "
                "so the resumed order is not the one the interrupted run would have used",
                st.n_rows,
                len(self.buckets.rows),
            )
        self.epoch = st.epoch
        self.position = resume_position(st, self.device_batch_size)
        g = state.get("variant_generations")
        self._generations = None
        if g is not None and self.position > 0:
            have = self._current_generations()
            if have is not None and have < g:
                raise DataError(
                    f"epoch {st.epoch} of this run trained on {g} latent variant(s) per image, but the dataset "
                    f"now has {have} for every image: restore the missing variant shards to resume exactly"
                )
            self._generations = (st.epoch, int(g))
        if st.device_batch_size != self.device_batch_size:
            log.warning(
                "device batch size changed %d -> %d: epoch %d is re-planned and resumes at sample %d "
                "(batch %d); see docs/data-loading.md",
                st.device_batch_size,
                self.device_batch_size,
                st.epoch,
                self.position * self.device_batch_size,
                self.position,
            )
        elif st.world_size != self.world_size:
            log.info(
                "world size changed %d -> %d: the global batch sequence continues unchanged at batch %d",
                st.world_size,
                self.world_size,
                self.position,
            )

    # -- iteration -----------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            buckets = (
                self.buckets
                if self.mix is None
                else self.mix.expand(self.buckets, seed=self.seed, epoch=epoch)
            )
            self._plan = plan_epoch(
                buckets, seed=self.seed, epoch=epoch, device_batch_size=self.device_batch_size
            )
        return self._plan

    def _current_generations(self) -> int | None:
        get = getattr(self.dataset, "complete_generations", None)
        return get() if get is not None else None

    def generations(self, epoch: int) -> int | None:
        """Variant generations `epoch` trains on: decided once, at its start, from the index then
        (re-read when `refresh_variants`), and kept in the loader state for exact resume."""
        if self._generations is None or self._generations[0] != epoch:
            # the first epoch this loader runs uses the index as just opened; later ones re-read it
            first = self._generations is None
            refresh = None if first else getattr(self.dataset, "refresh_variants", None)
            g = (
                refresh()
                if refresh is not None and self.cfg.refresh_variants
                else self._current_generations()
            )
            self._generations = (epoch, g)
            if g is not None:
                log.info("epoch %d trains on %d latent variant(s) per image", epoch, g)
        return self._generations[1]

    def batches_per_epoch(self) -> int:
        """Steps (one batch per rank) in a full epoch."""
        return self.plan(self.epoch).steps_from(0, self.world_size)

    def _items(self, plan: EpochPlan, start: int) -> _PlanItems:
        positions = plan.rank_positions(start, self.rank, self.world_size)
        return _PlanItems(plan, positions, self.buckets.bucket_chunks)

    def __iter__(self) -> Iterator[Batch]:
        w = self.world_size
        while True:
            plan = self.plan(self.epoch)
            items = self._items(plan, self.position)
            if self.position == 0:
                dropped = plan.leftover_samples + plan.tail_dropped(0, w) * plan.device_batch_size
                self.stats.dropped_per_epoch[plan.epoch] = dropped
                log.debug(
                    "epoch %d: %d batches of %d per rank; %d image(s) dropped this epoch (%d in incomplete "
                    "bucket batches, %d batch(es) at the end not divisible by world size %d)",
                    plan.epoch,
                    plan.steps_from(0, w),
                    plan.device_batch_size,
                    dropped,
                    plan.leftover_samples,
                    plan.tail_dropped(0, w),
                    w,
                )
            if not items:
                if self.position > 0:  # resumed exactly at the end of an epoch
                    self.epoch, self.position = self.epoch + 1, 0
                    continue
                raise DataError("an epoch planned no batch for this rank; the training split is too small")
            yield from self._run(items, self.generations(plan.epoch))
            self._log_stats()
            self.epoch += 1
            self.position = 0

    def _run(self, items: Sequence[BatchItem], generations: int | None) -> Iterator[Batch]:
        """This rank's batches `items` (read with at most `generations` variants), with the records
        fetched ahead from object storage, advancing the position as each batch is handed out."""
        source = _BatchSource(
            self.dataset, self.cfg, self.seed, self.aliases, self.token_estimates, items, generations
        )
        ahead = Prefetcher.for_loader(self.dataset, items, self.cfg, self.seed, generations)
        try:
            for k, batch in enumerate(_iterate(source, self.cfg, ahead.start if ahead else None)):
                if ahead is not None:
                    ahead.consumed(k + 1)
                self.position = batch.position - self.rank + self.world_size
                self.stats.add(batch, self.cfg.max_chunks)
                yield batch
        finally:
            if ahead is not None:
                ahead.stop()

    def _log_stats(self) -> None:
        s = self.stats
        if not s.batches:
            return
        hist = ", ".join(
            f"{c} chunk(s) {n / s.batches:.0%}" for c, n in sorted(s.chunk_hist.items(), reverse=True)
        )
        log.debug(
            "epoch %d done on rank %d: %d batches so far (%s); chunk estimate missed in %.1f%% of batches and "
            "%.1f%% of samples; %d prompt(s) truncated",
            self.epoch,
            self.rank,
            s.batches,
            hist,
            100 * s.batch_estimate_mismatch / s.batches,
            100 * s.sample_estimate_mismatch / max(s.samples, 1),
            s.truncated,
        )


class Prefetcher:
    """Fetches the records of the next `depth` planned batches into the dataset's local cache.

    The order is known ahead (the epoch plan), so a background thread in the main process keeps
    the cache `depth` batches ahead of what the trainer has consumed, fetching many records at
    once with concurrent ranged reads; the DataLoader workers then read from the local disk. It
    changes where bytes come from, never which bytes: the batches are the same with or without it.
    """

    def __init__(
        self, dataset, items: Sequence[BatchItem], depth: int, concurrency: int, seed: int, generations
    ):
        import threading

        self.dataset, self.items, self.depth, self.concurrency = dataset, items, depth, concurrency
        self.seed, self.generations = seed, generations
        self._done = 0
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bigasp-prefetch")
        self.fetched = 0

    @classmethod
    def for_loader(cls, dataset, items, cfg: DataConfig, seed: int, generations) -> Prefetcher | None:
        if cfg.prefetch_batches <= 0 or getattr(dataset, "cache", None) is None:
            return None
        return cls(dataset, items, cfg.prefetch_batches, cfg.read_concurrency, seed, generations)

    def start(self) -> None:
        self._thread.start()

    def consumed(self, n: int) -> None:
        with self._cond:
            self._done = n
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        nxt = 0
        while nxt < len(self.items):
            with self._cond:
                while not self._stopped and nxt >= self._done + self.depth:
                    self._cond.wait()
                if self._stopped:
                    return
                end = min(len(self.items), self._done + self.depth)
            try:
                recs = np.concatenate(
                    [
                        batch_records(
                            self.dataset,
                            it.rows,
                            seed=self.seed,
                            epoch=it.epoch,
                            generations=self.generations,
                        )
                        for it in (self.items[j] for j in range(nxt, end))
                    ]
                )
                # in waves of `concurrency` records, in plan order: the batches needed first land first
                for k in range(0, len(recs), self.concurrency):
                    if self._stopped:
                        return
                    self.fetched += self.dataset.prefetch(
                        recs[k : k + self.concurrency], concurrency=self.concurrency
                    )
            except Exception as err:  # the reads themselves retry and report
                log.debug("prefetch failed: %s", err)
            nxt = end


def open_dataset(cfg: DataConfig, *, streaming: bool = False):
    """The `LatentDataset` of `[data]` (a `MultiDataset` for a list of datasets), with the
    object-storage options (cache, retries) applied; see `bigasp.train.datasets`. `streaming`:
    opened empty, for a run whose first pass follows the encoder (train/stream.py)."""
    from bigasp.train.datasets import open_datasets

    return open_datasets(cfg, streaming=streaming)


# ---------------------------------------------------------------------------------------------
# Validation / stable batches


def eval_batches(
    dataset,
    indices: np.ndarray,
    cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    device_batch_size: int | None = None,
    seed: int | None = None,
) -> Iterator[Batch]:
    """Deterministic bucket-homogeneous batches over `indices`, each index exactly once across ranks.

    Prompts use the fixed key `(seed, EVAL_EPOCH, row)`, so every call (and every rank count)
    sees the same prompt per image. Bucket tails are kept as smaller batches; batch `j` goes to
    rank `j % world_size`, so ranks may get different numbers of batches.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    seed = cfg.seed if seed is None else int(seed)
    b = cfg.device_batch_size if device_batch_size is None else int(device_batch_size)
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return
    # Estimates from the evaluated rows only: O(len(indices)), not O(dataset), per evaluation.
    sub = dataset.table.take(pa.array(indices))
    sub_tokens = row_token_estimates(sub, cfg.prompt)
    tokens = np.zeros(len(dataset.table), dtype=np.int32)
    tokens[indices] = sub_tokens
    chunks = row_chunk_estimates(sub, cfg, sub_tokens) if cfg.chunk_bucketing else None
    buckets = build_row_buckets(
        indices,
        sub.column("bucket_height").to_numpy(zero_copy_only=False),
        sub.column("bucket_width").to_numpy(zero_copy_only=False),
        chunks,
    )
    key_of = {int(r): int(buckets.bucket_chunks[k]) for r, k in zip(buckets.rows, buckets.keys, strict=True)}
    batches = eval_plan(buckets, device_batch_size=b)
    mine = [
        BatchItem(rows, EVAL_EPOCH, j, key_of[int(rows[0])])
        for j, rows in enumerate(batches)
        if j % world_size == rank
    ]
    if not mine:
        return
    source = _BatchSource(dataset, cfg, seed, load_aliases(cfg), tokens, mine)
    yield from _iterate(source, cfg)
