"""`MultiDataset`: several separately ingested and encoded datasets read as one training set.

A run may train on a photo dataset and an anime dataset prepared apart (bigASP v2.5 mixed such
sources; kohya users list several dataset subsets). The rows are the members' rows concatenated
in the configured order, each member's in its own order (sorted by id), so row numbers, and with
them the split, the epoch plan and every key derived from a row, are a function of the member
list. Record reads, prefetches and variant refreshes go to the member that holds the row.

The table gains a `dataset` column (dictionary-encoded member names), which `[data.mix] by =
"dataset"` groups by. An image id present in two members stays two rows (two captions of one
picture are two training samples, as two kohya subsets would make them); the split hashes ids, so
both copies land on the same side and a held-out image is never trained on through its twin.

Members must hold latents the model can train on together: the same VAE (unless `check_vae` is
off, as for a single dataset), the same scaling factor, the same latent draw (mean or sample) and
the same stored format (channels, dtype). The encode seed may differ. A disagreement is one `DataError` naming both datasets and the field.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bigasp.errors import DataError
from bigasp.store.reader import LatentDataset

log = logging.getLogger(__name__)

DATASET_COLUMN = "dataset"  # the member name of each row, for `[data.mix] by = "dataset"`

# Header fields that must agree across members: a model trains on one latent space.
AGREE_FIELDS = ("scaling_factor", "latent", "channels", "dtype", "vae_id")


class MultiDataset:
    """The rows of `members` one after another, with `LatentDataset`'s reading interface."""

    def __init__(self, members: Sequence[LatentDataset], names: Sequence[str], *, check_vae: bool = True):
        if not members or len(members) != len(names):
            raise ValueError("MultiDataset needs one name per member and at least one member")
        if len(set(names)) != len(names):
            raise ValueError(f"MultiDataset member names must be distinct (got {list(names)})")
        self.members = list(members)
        self.names = [str(n) for n in names]
        check_same_encoding(self.members, self.names, check_vae=check_vae)
        lengths = np.array([len(m) for m in self.members], dtype=np.int64)
        self._row_start = np.concatenate([[0], np.cumsum(lengths)])
        self.table: pa.Table = _concat_tables(self.members, self.names, lengths)
        self.root_url = " + ".join(m.root_url for m in self.members)
        self.n_images = sum(m.n_images for m in self.members)
        self.n_orphan_latents = sum(m.n_orphan_latents for m in self.members)
        self.shared_ids = _count_shared_ids(self.members)
        if self.shared_ids:
            log.info(
                "%d image id(s) are in more than one of the datasets %s: each copy is its own training row "
                "(the split keeps the copies of an image on one side)",
                self.shared_ids,
                ", ".join(self.names),
            )
        self._set_variants()

    def _set_variants(self) -> None:
        # Global record numbers (`rec`): member k's records follow those of members 0..k-1.
        self.n_variants = (
            np.concatenate([m.n_variants for m in self.members]).astype(np.int32)
            if len(self)
            else np.zeros(0, np.int32)
        )
        n_recs = np.array([len(m.records) for m in self.members], dtype=np.int64)
        self._rec_start = np.concatenate([[0], np.cumsum(n_recs)])

    @property
    def cache(self):
        """A member's record cache when any member is on object storage (so the loader prefetches)."""
        return next((m.cache for m in self.members if m.cache is not None), None)

    def __len__(self) -> int:
        return int(self._row_start[-1])

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={len(m)}" for n, m in zip(self.names, self.members, strict=True))
        return f"MultiDataset({parts})"

    # -- where a row or record lives -----------------------------------------------------------
    def locate(self, i: int) -> tuple[int, int]:
        """(member index, row within that member) of row `i`."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for a dataset of {len(self)} latents")
        k = int(np.searchsorted(self._row_start, i, side="right")) - 1
        return k, int(i - self._row_start[k])

    def member_of_rows(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Member index of each of `rows` (all rows when None)."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        return np.searchsorted(self._row_start, rows, side="right").astype(np.int64) - 1

    def _locate_rec(self, r: int) -> tuple[int, int]:
        k = int(np.searchsorted(self._rec_start, r, side="right")) - 1
        if not (0 <= k < len(self.members) and r < self._rec_start[-1]):
            raise IndexError(f"record {r} out of range for {int(self._rec_start[-1])} records")
        return k, int(r - self._rec_start[k])

    # -- the LatentDataset interface the loader and trainer use ----------------------------------
    def rec(self, i: int, variant: int = 0) -> int:
        k, j = self.locate(i)
        return int(self._rec_start[k]) + self.members[k].rec(j, variant)

    def latent_shape(self, i: int) -> tuple[int, int, int]:
        k, j = self.locate(i)
        return self.members[k].latent_shape(j)

    def crop_of(self, i: int, variant: int = 0) -> tuple[int, int]:
        k, j = self.locate(i)
        return self.members[k].crop_of(j, variant)

    def read_bytes(self, i: int, variant: int = 0) -> bytes:
        k, j = self.locate(i)
        return self.members[k].read_bytes(j, variant)

    def read_latent(self, i: int, variant: int = 0):
        k, j = self.locate(i)
        return self.members[k].read_latent(j, variant)

    def read_latent_numpy(self, i: int, variant: int = 0) -> np.ndarray:
        k, j = self.locate(i)
        return self.members[k].read_latent_numpy(j, variant)

    def _cache_key(self, r: int) -> str:
        k, j = self._locate_rec(r)
        return self.members[k]._cache_key(j)

    def prefetch(self, recs, *, concurrency: int = 32) -> int:
        """Prefetch records `recs` (see `rec`), each from its member; returns how many were fetched."""
        recs = np.asarray(list(recs), dtype=np.int64)
        if not len(recs):
            return 0
        owner = np.searchsorted(self._rec_start, recs, side="right") - 1
        fetched = 0
        for k in dict.fromkeys(owner.tolist()):  # members in the order their records are first needed
            m = self.members[k]
            if m.cache is not None:
                fetched += m.prefetch(recs[owner == k] - self._rec_start[k], concurrency=concurrency)
        return fetched

    def complete_generations(self) -> int:
        """Variants every row of every member has."""
        return int(self.n_variants.min()) if len(self) else 0

    def refresh_variants(self) -> int:
        """Each member takes in variants published since it was opened; returns `complete_generations()`."""
        for m in self.members:
            m.refresh_variants()
        self._set_variants()
        return self.complete_generations()

    def verify(self) -> list[str]:
        return [e for m in self.members for e in m.verify()]

    def describe(self) -> list[dict[str, Any]]:
        """Per member: name, URL, latents and rows (first, last+1) in the combined table."""
        return [
            {
                "name": n,
                "dataset": m.root_url,
                "latents": len(m),
                "rows": [int(self._row_start[k]), int(self._row_start[k + 1])],
            }
            for k, (n, m) in enumerate(zip(self.names, self.members, strict=True))
        ]


def _concat_tables(members: Sequence[LatentDataset], names: Sequence[str], lengths: np.ndarray) -> pa.Table:
    try:
        table = pa.concat_tables([m.table for m in members], promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(
            f"the tables of {' and '.join(m.root_url for m in members)} do not combine ({err}); "
            "ingest them with one bigasp version"
        ) from None
    codes = pa.array(np.repeat(np.arange(len(members), dtype=np.int32), lengths), pa.int32())
    column = pa.DictionaryArray.from_arrays(codes, pa.array(list(names), pa.string()))
    return table.combine_chunks().append_column(DATASET_COLUMN, column)


def _count_shared_ids(members: Sequence[LatentDataset]) -> int:
    if len(members) < 2:
        return 0
    ids = pa.chunked_array([m.table.column("id") for m in members if len(m)], pa.string())
    if not len(ids):
        return 0
    counts = pc.value_counts(ids)
    return int(pc.sum(pc.greater(counts.field("counts"), 1)).as_py() or 0)


def _first_encoding(ds: LatentDataset) -> dict[str, Any] | None:
    """The encoding recorded in one shard header of `ds` (None: no latents yet). A dataset mixing
    encodings inside itself is the single-dataset check's to report."""
    from bigasp.store.shard import encoding_of

    headers = ds.shard_headers(1) if ds.shards else {}
    if not headers:
        return None
    header = next(iter(headers.values()))
    shape = header.get("shape") or [None]
    return encoding_of(header) | {"channels": shape[0], "dtype": header.get("dtype")}


def _differ(field: str, a, b) -> bool:
    if a is None or b is None:
        return False  # not recorded (an older encode): nothing to compare
    if field == "scaling_factor":
        return abs(float(a) - float(b)) > 1e-6 * max(abs(float(a)), abs(float(b)))
    return a != b


def check_same_encoding(
    members: Sequence[LatentDataset], names: Sequence[str], *, check_vae: bool = True
) -> None:
    """Members hold latents of one VAE, scaling factor, latent draw and format; else a one-line `DataError`
    naming both datasets and the field (a differing VAE is only a warning with `check_vae` off)."""
    seen: list[tuple[str, LatentDataset, dict[str, Any]]] = []
    for name, m in zip(names, members, strict=True):
        enc = _first_encoding(m)
        if enc is None:
            continue
        for other_name, other, other_enc in seen:
            for field in AGREE_FIELDS:
                if not _differ(field, other_enc.get(field), enc.get(field)):
                    continue
                message = (
                    f"datasets {other_name} ({other.root_url}) and {name} ({m.root_url}) differ in {field}: "
                    f"{other_enc.get(field)} vs {enc.get(field)}; a model trains on one latent space, so "
                    "re-encode one of them like the other (bigasp encode --vae <the model's VAE>)"
                )
                if field == "vae_id" and not check_vae:
                    log.warning("%s (data.check_vae = false: training anyway)", message)
                    continue
                raise DataError(message)
        seen.append((name, m, enc))


def check_resumed_names(saved: list[str] | None, dataset) -> None:
    """A resumed run lists the datasets it was saved with, in the same order: the rows, the split
    and the epoch order follow the list, so another list would silently train another order."""
    if saved is None:
        return  # saved by a run on one dataset
    now = list(getattr(dataset, "names", None) or [])
    if list(saved) != now:
        raise DataError(
            f"this run was saved training on the datasets {list(saved)} in that order, but data.dataset now "
            f"gives {now}: list the same datasets in the same order to resume (rows, split and epoch order "
            "follow the list), or start a new run"
        )
