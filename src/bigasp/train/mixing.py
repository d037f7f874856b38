"""Dataset mixing: how often each source, folder or dataset of the training split appears per epoch.

bigASP v2.5 mixed photo and anime sources in set proportions; kohya users give a folder
`N_name` to repeat its images N times, or list several dataset subsets (here: several datasets in
`data.dataset`, grouped with `by = "dataset"`). All are one thing here: a per-group **repeat factor**
`r` (from `[data.mix] repeats`, or derived from `weights` so each group's share of an epoch is
its weight). Each epoch takes every image of the group `floor(r)` times plus a random
`round(frac(r) * n)` of them once more, drawn without replacement by a generator keyed by
`(seed, epoch)` alone. The epoch plan (sampler.py) then buckets and shuffles that multiset as
usual, so the order stays a pure function of `(seed, epoch)` and resumes exactly.

Copies of one image in an epoch are told apart: the plan stores `row | copy << COPY_SHIFT`, and
the trainer keys a copy's noise and timestep by its copy number too (the first copy keeps the
unmixed key), so a repeated image is trained at other timesteps, not twice on the same one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from bigasp.config import Section
from bigasp.errors import ConfigError
from bigasp.text.synthesis import prompt_rng
from bigasp.train.sampler import COPY_SHIFT, ROW_MASK, RowBuckets

__all__ = ["COPY_SHIFT", "ROW_MASK", "Mix", "MixConfig", "build_mix", "group_labels"]


class MixConfig(Section):
    """`[data.mix]`: per-group weights or repeats (unset = every image once per epoch)."""

    by: Literal["source", "folder", "dataset"] = Field(
        "source",
        description="What a group is: the manifest's `source` column (sidecar `source`, empty = ''), the "
        "folder an image was ingested from (its path without the file name; a tar member's tar file), or "
        "the dataset of `data.dataset` it comes from (named by its `name` or folder name).",
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Share of each epoch's samples per group, e.g. {photo = 0.7, anime = 0.3} (normalised; 0 "
        "drops a group). Every group in the training split must be named. An epoch keeps its length.",
    )
    repeats: dict[str, float] = Field(
        default_factory=dict,
        description="Times each image of a group appears per epoch (kohya's N_ folder prefix); fractions "
        "take a fresh random part each epoch. Unnamed groups: 1.",
    )
    ingest_repeats: bool = Field(
        True,
        description="With neither weights nor repeats set: use the repeats ingest recorded from kohya "
        "`N_name` folders (the images' `repeats` in `extra`, their `source` = name) as per-source repeats.",
    )

    @model_validator(mode="after")
    def _check(self) -> MixConfig:
        if self.weights and self.repeats:
            raise ValueError("set data.mix.weights or data.mix.repeats, not both")
        for key, table in (("weights", self.weights), ("repeats", self.repeats)):
            bad = {k: v for k, v in table.items() if not (math.isfinite(v) and v >= 0)}
            if bad:
                raise ValueError(f"data.mix.{key} must be finite and >= 0 (got {bad})")
        if self.weights and sum(self.weights.values()) <= 0:
            raise ValueError("data.mix.weights are all 0: nothing would train")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.weights or self.repeats)


def group_labels(table: pa.Table, by: str) -> tuple[list[str], np.ndarray]:
    """(group names, per-row group code) for every row of the dataset table."""
    if by == "dataset":
        if "dataset" not in table.column_names:
            raise ConfigError(
                "data.mix.by = 'dataset' groups the datasets of data.dataset, but this dataset was opened "
                "without their names; open it with bigasp.train.data.open_dataset"
            )
        col = table.column("dataset").combine_chunks()
        if pa.types.is_dictionary(col.type):  # MultiDataset's column: the names, in configured order
            return [str(x) for x in col.dictionary.to_pylist()], col.indices.to_numpy(
                zero_copy_only=False
            ).astype(np.int64)
        col = pc.fill_null(col.cast(pa.string()), "")
    elif by == "source":
        col = table.column("source") if "source" in table.column_names else pa.nulls(len(table), pa.string())
        col = pc.fill_null(col.cast(pa.string()), "")
    else:
        paths = pc.fill_null(table.column("path").cast(pa.string()), "")
        tar = pc.extract_regex(paths, r"^(?P<tar>.*?)::")  # a tar member: its tar file is the folder
        in_tar = pc.is_valid(tar)
        folder = pc.replace_substring_regex(paths, r"/[^/]*$", "")
        col = pc.if_else(in_tar, pc.struct_field(tar, [0]), folder)
    enc = (
        col.combine_chunks().dictionary_encode()
        if isinstance(col, pa.ChunkedArray)
        else col.dictionary_encode()
    )
    return [str(x) for x in enc.dictionary.to_pylist()], enc.indices.to_numpy(zero_copy_only=False).astype(
        np.int64
    )


@dataclass(frozen=True)
class Mix:
    """The resolved mix of one training split: per group its images and repeat factor."""

    names: list[str]
    members: list[np.ndarray]  # per group: positions in the base RowBuckets
    repeats: np.ndarray  # float64 per group

    def counts(self) -> np.ndarray:
        """Images per epoch per group (the same every epoch)."""
        n = np.array([len(m) for m in self.members], dtype=np.float64)
        return np.floor(self.repeats) * n + np.rint((self.repeats - np.floor(self.repeats)) * n)

    def expand(self, buckets: RowBuckets, *, seed: int, epoch: int) -> RowBuckets:
        """The epoch's multiset of rows, as RowBuckets with the base buckets' ids (keyed by seed, epoch)."""
        rng = prompt_rng(seed, epoch, 0, domain=b"mix")
        idx, copies = [], []
        for members, r in zip(self.members, self.repeats, strict=True):
            whole = math.floor(r)
            extra = int(np.rint((r - whole) * len(members)))
            idx += [np.tile(members, whole), rng.choice(members, extra, replace=False)]
            copies += [np.repeat(np.arange(whole, dtype=np.int64), len(members)), np.full(extra, whole)]
        at = np.concatenate(idx).astype(np.int64)
        copy = np.concatenate(copies).astype(np.int64)
        keys = buckets.keys[at]
        return RowBuckets(
            rows=buckets.rows[at] | (copy << COPY_SHIFT),
            keys=keys,
            bucket_hw=buckets.bucket_hw,
            bucket_chunks=buckets.bucket_chunks,
            counts=np.bincount(keys, minlength=buckets.n_buckets).astype(np.int64),
        )

    def group_of_rows(self, buckets: RowBuckets, n_rows: int) -> np.ndarray:
        """Group index of each dataset row (-1 = not in the training split)."""
        out = np.full(n_rows, -1, dtype=np.int64)
        for g, members in enumerate(self.members):
            out[buckets.rows[members]] = g
        return out

    def describe(self) -> list[dict]:
        counts = self.counts()
        total = max(float(counts.sum()), 1.0)
        return [
            {
                "group": name,
                "images": len(m),
                "repeats": float(r),
                "per_epoch": int(c),
                "share": float(c) / total,
            }
            for name, m, r, c in zip(self.names, self.members, self.repeats, counts, strict=True)
        ]


def recorded_repeats(table: pa.Table) -> dict[str, float]:
    """Per-source repeats that ingest recorded from kohya `N_name` folders (`extra.repeats`)."""
    if "extra" not in table.column_names or "source" not in table.column_names:
        return {}
    extra = pc.fill_null(table.column("extra").cast(pa.string()), "")
    found = pc.extract_regex(extra, r'"repeats":\s*(?P<n>[0-9]+)')
    hit = pc.is_valid(found)
    if not pc.any(hit).as_py():
        return {}
    n = pc.struct_field(found.filter(hit), "n").to_numpy(zero_copy_only=False).astype(np.float64)
    sources = pc.fill_null(table.column("source").filter(hit).cast(pa.string()), "").to_pylist()
    out: dict[str, float] = {}
    for src, r in zip(sources, n, strict=True):
        if out.setdefault(src, r) != r:
            raise ConfigError(
                f"images of source {src!r} were ingested with different kohya repeats ({out[src]:g} and {r:g}); "
                "set data.mix.repeats for it explicitly"
            )
    return out


def build_mix(table: pa.Table, buckets: RowBuckets, cfg: MixConfig) -> Mix | None:
    """Resolve `[data.mix]` against the training split (`buckets.rows` index `table`); None = no mixing."""
    if not cfg.enabled:
        recorded = recorded_repeats(table) if cfg.ingest_repeats and cfg.by == "source" else {}
        if not recorded:
            return None
        names, codes = group_labels(table, "source")
        present = {names[c] for c in np.unique(codes[buckets.rows]).tolist()}
        cfg = cfg.model_copy(update={"repeats": {k: v for k, v in recorded.items() if k in present}})
        if not cfg.repeats:
            return None
    names, codes = group_labels(table, cfg.by)
    row_codes = codes[buckets.rows]
    present = sorted(set(np.unique(row_codes).tolist()), key=lambda c: names[c])
    members = [np.flatnonzero(row_codes == c) for c in present]
    labels = [names[c] for c in present]
    table_ = cfg.weights or cfg.repeats
    key = "weights" if cfg.weights else "repeats"
    unknown = sorted(set(table_) - set(labels))
    if unknown:
        raise ConfigError(
            f"data.mix.{key} names {unknown}, which the training split has no images of (by {cfg.by}); "
            f"its groups are {labels[:20]}"
        )
    if cfg.weights:
        unnamed = [g for g in labels if g not in cfg.weights]
        if unnamed:
            raise ConfigError(
                f"data.mix.weights does not name group(s) {unnamed[:20]} of the training split (by {cfg.by}); "
                "give each a weight (0 leaves it out)"
            )
        total_w = sum(cfg.weights[g] for g in labels)
        n_total = len(buckets.rows)
        repeats = np.array(
            [cfg.weights[g] / total_w * n_total / len(m) for g, m in zip(labels, members, strict=True)]
        )
    else:
        repeats = np.array([cfg.repeats.get(g, 1.0) for g in labels], dtype=np.float64)
    return Mix(names=labels, members=members, repeats=repeats)
