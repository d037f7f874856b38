"""Training batches: config, the `Batch` the trainer consumes, collate, split, loaders.

The loader hands out *whole batches* from a map-style dataset over this rank's planned
batch list (`batch_size=None`), so a worker builds one batch end to end (read latents,
synthesise prompts, tokenise, collate). DataLoader returns items in index order whatever
the worker count, and every random choice is keyed by `(seed, epoch, row)`, so the stream
is identical for `num_workers` 0 or 16 and after any resume. Sampler semantics live in
`bigasp.train.sampler`; docs/data-loading.md explains both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from pydantic import Field

from bigasp.config import Section
from bigasp.errors import DataError
from bigasp.text import chunk_batch, tokenize
from bigasp.text.synthesis import PromptConfig

log = logging.getLogger(__name__)


class DataConfig(Section):
    """`[data]`: where training data comes from and how batches are formed."""

    dataset: str = Field("", description="Dataset directory (or fsspec URL) written by `bigasp encode`.")
    seed: int = Field(
        42, description="Run seed: split, epoch order and prompts all derive from it (bigASP: 42)."
    )
    device_batch_size: int = Field(4, ge=1, description="Samples per rank per micro-step.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank (0 = main process).")
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
    prompt: PromptConfig = Field(
        default_factory=PromptConfig, description="Prompt synthesis ([data.prompt])."
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
    meta: dict[str, Any] = field(default_factory=dict)

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
