"""Which datasets a run trains on: `data.dataset` as one path or URL, or a list of them.

A list names several separately ingested and encoded datasets (e.g. a photo set on local disk
and an anime set in a bucket); they train as one (`bigasp.store.multi.MultiDataset`), and
`[data.mix] by = "dataset"` weighs or repeats them. Each item is a path/URL string or a table
`{path = ..., name = ..., storage_options = {...}}`.

A dataset's name (its group under `by = "dataset"`) is its `name`, else the last part of its
path (the folder or bucket prefix). Two items that would get the same folder name are told apart
by a suffix: the second `train` is `train-2`, the third `train-3`. Explicit names must be distinct.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from bigasp.config import Section
from bigasp.errors import ConfigError


class DatasetEntry(Section):
    """One item of `data.dataset` written as a table."""

    path: str = Field(
        ..., min_length=1, description="Dataset directory or fsspec URL written by `bigasp encode`."
    )
    name: str = Field(
        "",
        description='Its group name for [data.mix] by = "dataset"; empty = the last part of `path`.',
    )
    storage_options: dict[str, Any] | None = Field(
        None,
        description="fsspec options for this dataset alone (e.g. another bucket's endpoint_url); "
        "unset = data.storage_options.",
    )


@dataclass(frozen=True)
class DatasetSpec:
    """A resolved item of `data.dataset`: its group name, URL, fsspec options and config key."""

    name: str
    url: str
    storage_options: dict[str, Any]
    key: str  # "data.dataset" or "data.dataset[k]", for messages


def is_multi(dataset: str | list) -> bool:
    return not isinstance(dataset, str)


def folder_name(url: str) -> str:
    """The last part of a path or URL: `/data/photos/` -> photos, `s3://bucket/anime` -> anime."""
    if "://" not in url:
        return Path(url).expanduser().resolve().name or url
    tail = url.rstrip("/").rsplit("/", 1)[-1]
    return tail.split("://", 1)[-1] or url


def dataset_specs(cfg) -> list[DatasetSpec]:
    """The datasets of `[data]` (a `DataConfig`) in the configured order, named and with their options."""
    items = [cfg.dataset] if isinstance(cfg.dataset, str) else list(cfg.dataset)
    if not items or any(not (i if isinstance(i, str) else i.path) for i in items):
        raise ConfigError(
            "data.dataset is not set: point it at a folder written by `bigasp ingest`/`bigasp encode` "
            "(or a list of them)"
        )
    multi = is_multi(cfg.dataset)
    entries = [DatasetEntry(path=i) if isinstance(i, str) else i for i in items]
    taken: dict[str, int] = {}
    for k, e in enumerate(entries):
        if e.name:
            if e.name in taken:
                raise ConfigError(
                    f"data.dataset[{k}].name = {e.name!r} is also the name of data.dataset[{taken[e.name]}]; "
                    "give each dataset its own name"
                )
            taken[e.name] = k
    names = []
    for k, e in enumerate(entries):
        name = e.name
        if not name:
            base = name = folder_name(e.path)
            n = 1
            while name in taken:
                n += 1
                name = f"{base}-{n}"
            taken[name] = k
        names.append(name)
    return [
        DatasetSpec(
            name=name,
            url=e.path,
            storage_options=dict(cfg.storage_options if e.storage_options is None else e.storage_options),
            key=f"data.dataset[{k}]" if multi else "data.dataset",
        )
        for k, (name, e) in enumerate(zip(names, entries, strict=True))
    ]


def open_datasets(cfg, *, streaming: bool = False):
    """The dataset(s) of `[data]`: one `LatentDataset` for a single path (unless the mix groups by
    dataset), else a `MultiDataset` of them all in the configured order. `streaming`: the single
    dataset opened empty for a streaming first pass (one dataset only)."""
    from bigasp.store import LatentDataset
    from bigasp.store.multi import MultiDataset
    from bigasp.store.streaming import StreamingLatentDataset

    specs = dataset_specs(cfg)
    if streaming and (is_multi(cfg.dataset) or cfg.mix.by == "dataset"):
        raise ConfigError(
            "data.stream follows one dataset's encoder: set data.dataset to a single dataset (or data.stream = "
            "false to train on several finished ones)"
        )
    remote = sum(1 for s in specs if "://" in s.url and not s.url.startswith("file://"))
    cache_bytes = int(cfg.cache_gb * 2**30 / max(remote, 1))  # the cache limit is shared by the buckets

    def open_one(spec: DatasetSpec) -> LatentDataset:
        opts = dict(spec.storage_options)
        if spec.url.startswith(("s3://", "s3a://")) and "config_kwargs" not in opts:
            # botocore keeps 10 connections by default, which would cap the reads in flight at 10
            opts["config_kwargs"] = {"max_pool_connections": max(cfg.read_concurrency, 10)}
        return (StreamingLatentDataset if streaming else LatentDataset)(
            spec.url,
            storage_options=opts,
            cache_dir=cfg.cache_dir or None,
            cache_bytes=cache_bytes,
            retries=cfg.read_retries,
        )

    if not is_multi(cfg.dataset) and cfg.mix.by != "dataset":
        return open_one(specs[0])
    return MultiDataset([open_one(s) for s in specs], [s.name for s in specs], check_vae=cfg.check_vae)
