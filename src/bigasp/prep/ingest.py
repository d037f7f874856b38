"""`bigasp ingest`: record every image of the sources in DATASET/manifest.parquet.

Crash safety: results are committed in parts (`parts/*.parquet`, each written atomically)
every `commit_every` images, and folded into manifest.parquet / rejects.parquet at the end
(or at the start of the next run, if this one died). A killed run therefore loses at most
the uncommitted part, and ids are unique by construction (content hash + dedup at fold), so
re-running never duplicates a row. Incremental: items whose (path, size, mtime) is already
in the manifest or rejects are skipped without reading them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from bigasp.buckets import BucketConfig, BucketSet
from bigasp.errors import DataError
from bigasp.prep.config import IngestConfig
from bigasp.prep.images import Reject, pixel_limit, probe
from bigasp.prep.sidecar import parse_sidecars
from bigasp.prep.sources import Item, scan
from bigasp.store import layout
from bigasp.store.manifest import MANIFEST_SCHEMA, REJECTS_SCHEMA, conform, init_dataset

log = logging.getLogger(__name__)


def content_id(data: bytes) -> str:
    """Stable image id: blake2b-128 of the file bytes (same photo under two names = one id)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class IngestSummary:
    scanned: int = 0
    new: int = 0
    skipped: int = 0  # already ingested or rejected by an earlier run (same path, size, mtime)
    duplicates: int = 0
    rejects: Counter = field(default_factory=Counter)  # reason -> count, duplicates excluded
    seconds: float = 0.0
    total_images: int = 0  # manifest rows after this run

    @property
    def images_per_second(self) -> float:
        return (self.scanned - self.skipped) / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "scanned": self.scanned,
            "new": self.new,
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "rejects": dict(sorted(self.rejects.items())),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 1),
            "total_images": self.total_images,
        }


def _reject_row(item: Item, reason: str, detail: str, iid: str | None = None) -> dict[str, Any]:
    return {
        "path": item.path,
        "reason": reason,
        "detail": detail,
        "file_size": item.data.size,
        "mtime": item.mtime,
        "id": iid,
        "stage": "ingest",
    }


def examine(item: Item, cfg: IngestConfig, buckets: BucketSet) -> tuple[str, dict[str, Any]]:
    """("ok", manifest row) or ("reject", rejects row) for one item; never raises for bad input."""
    try:
        if item.missing:
            raise Reject("unreadable", item.error or "listed path does not exist")
        try:
            data = item.data.read()
        except OSError as err:
            raise Reject("unreadable", str(err)) from None
        if len(data) != item.data.size:
            raise Reject(
                "unreadable", f"read {len(data)} of {item.data.size} bytes (file changed while reading?)"
            )
        info = probe(
            data, name=item.path, max_pixels=cfg.max_pixels, animated=cfg.animated, verify=cfg.verify
        )
        if not cfg.allow_upscale and not buckets.fits_without_upscale(info.height, info.width):
            b = buckets.nearest(info.height, info.width)
            raise Reject(
                "too_small",
                f"{info.width}x{info.height} is smaller than its bucket {b.width}x{b.height} (--allow-upscale keeps it)",
            )
        try:
            txt = item.txt.read() if item.txt else None
            js = item.json.read() if item.json else None
        except OSError as err:
            raise Reject("bad_sidecar", f"cannot read sidecar: {err}") from None
        ann = parse_sidecars(
            txt, js, txt_name=item.txt.file if item.txt else "", json_name=item.json.file if item.json else ""
        )
    except Reject as r:
        return "reject", _reject_row(item, r.reason, r.detail)
    row = {
        "id": content_id(data),
        "path": item.path,
        "tar_offset": item.data.offset,
        "file_size": item.data.size,
        "mtime": item.mtime,
        "format": info.format,
        "mode": info.mode,
        "width": info.width,
        "height": info.height,
        "orientation": info.orientation,
        "captions": ann.captions,
        "tags": ann.tags,
        "score": ann.score,
        "source": ann.source,
        "watermark": ann.watermark,
        "extra": json.dumps(ann.extra, sort_keys=True, ensure_ascii=False),
    }
    return "ok", row


class _Examiner:
    """Picklable callable for worker processes (sets the pixel limit once per process)."""

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        self.buckets = BucketSet((cfg.buckets or BucketConfig()).buckets())
        self._limit = None

    def __call__(self, item: Item) -> tuple[str, dict[str, Any]]:
        if self._limit is None:
            self._limit = pixel_limit(self.cfg.max_pixels)
            self._limit.__enter__()
        return examine(item, self.cfg, self.buckets)


def _results(items: Iterator[Item], cfg: IngestConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    fn = _Examiner(cfg)
    if cfg.workers <= 1:
        with pixel_limit(cfg.max_pixels):
            for item in items:
                yield examine(item, cfg, fn.buckets)
        return
    import itertools
    import multiprocessing as mp

    with mp.get_context("fork").Pool(cfg.workers) as pool:
        # Pool.imap drains its input eagerly; feed bounded chunks so memory stays flat.
        while chunk := list(itertools.islice(items, 4096)):
            yield from pool.imap(fn, chunk, chunksize=64)


# --- parts: the crash-safe commit log -------------------------------------------------------


def _parts(root: Path, kind: str) -> list[Path]:
    d = root / layout.PARTS_DIR
    return sorted(p for p in d.glob(f"{kind}-*.parquet") if layout.visible(p.name)) if d.is_dir() else []


def _read(path: Path, schema: pa.Schema) -> pa.Table:
    import pyarrow.parquet as pq

    return conform(pq.read_table(path), schema)


def _dedup(table: pa.Table, key: str, keep: str) -> pa.Table:
    """Keep the first (or last) row per key, preserving order otherwise."""
    vals = table.column(key).to_pylist()
    order = range(len(vals)) if keep == "first" else range(len(vals) - 1, -1, -1)
    seen: set = set()
    idx = [i for i in order if not (vals[i] in seen or seen.add(vals[i]))]
    return table.take(pa.array(sorted(idx), pa.int64()))


def fold_parts(root: Path) -> None:
    """Merge committed parts into manifest.parquet / rejects.parquet, then delete the parts."""
    mparts, rparts = _parts(root, "manifest"), _parts(root, "rejects")
    if not mparts and not rparts:
        return
    mpath, rpath = root / layout.MANIFEST, root / layout.REJECTS
    tables = ([_read(mpath, MANIFEST_SCHEMA)] if mpath.exists() else []) + [
        _read(p, MANIFEST_SCHEMA) for p in mparts
    ]
    manifest = (
        _dedup(pa.concat_tables(tables), "id", "first").sort_by("id")
        if tables
        else MANIFEST_SCHEMA.empty_table()
    )
    tables = ([_read(rpath, REJECTS_SCHEMA)] if rpath.exists() else []) + [
        _read(p, REJECTS_SCHEMA) for p in rparts
    ]
    rejects = _dedup(pa.concat_tables(tables), "path", "last") if tables else REJECTS_SCHEMA.empty_table()
    accepted = set(manifest.column("path").to_pylist())
    rejects = rejects.filter(
        pa.array([p not in accepted for p in rejects.column("path").to_pylist()], pa.bool_())
    )
    layout.atomic_write_parquet(rejects, rpath)
    layout.atomic_write_parquet(manifest, mpath)  # written last: the commit point
    for p in mparts + rparts:
        p.unlink()


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    f = open(root / ".ingest.lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another `bigasp ingest` is writing {root}; wait for it to finish") from None
        yield
    finally:
        f.close()


def _key(path: str, size: int | None, mtime: float | None) -> bytes:
    """16-byte digest of an incremental key: ~50 bytes per file in memory instead of ~250."""
    return hashlib.blake2b(f"{path}\0{size}\0{mtime!r}".encode(), digest_size=16).digest()


def _known(root: Path) -> tuple[set[str], set[bytes]]:
    ids: set[str] = set()
    keys: set[bytes] = set()
    for path, schema in ((root / layout.MANIFEST, MANIFEST_SCHEMA), (root / layout.REJECTS, REJECTS_SCHEMA)):
        if path.exists():
            t = _read(path, schema)
            if schema is MANIFEST_SCHEMA:
                ids.update(t.column("id").to_pylist())
            cols = (t.column(c).to_pylist() for c in ("path", "file_size", "mtime"))
            keys.update(_key(*k) for k in zip(*cols, strict=True))
    return ids, keys


def _resolve_buckets(root: Path, cfg: IngestConfig) -> IngestConfig:
    """Unset buckets = the dataset's recorded rule, so a plain re-run never changes the rule."""
    path = root / layout.DATASET_JSON
    recorded = json.loads(path.read_text()).get("buckets") if path.exists() else None
    if cfg.buckets is None:
        rule = BucketConfig(**recorded) if recorded else BucketConfig()
        return cfg.model_copy(update={"buckets": rule})
    if recorded and BucketConfig(**recorded) != cfg.buckets:
        log.warning(
            "%s was ingested with buckets %s; switching to %s (latents already encoded keep their buckets)",
            root,
            recorded,
            cfg.buckets.model_dump(),
        )
    return cfg


def ingest(
    sources: Iterable[str | os.PathLike], out: str | os.PathLike, cfg: IngestConfig | None = None
) -> IngestSummary:
    """Scan `sources` into the dataset directory `out`; returns counts (also for benchmarks)."""
    cfg = cfg or IngestConfig()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = IngestSummary()
    with _lock(root):
        cfg = _resolve_buckets(root, cfg)
        init_dataset(
            root, {"buckets": cfg.buckets.model_dump(), "ingest": cfg.model_dump(exclude={"buckets"})}
        )
        fold_parts(root)  # a previous run that died left committed parts: keep them
        ids, keys = _known(root)

        def todo() -> Iterator[Item]:  # streamed: 10M+ files never sit in a list
            for item in scan(list(sources)):
                summary.scanned += 1
                if _key(*item.key) in keys:
                    summary.skipped += 1
                else:
                    yield item

        run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        rows: list[dict] = []
        rejects: list[dict] = []
        seq = 0

        def commit() -> None:
            nonlocal seq, rows, rejects
            if not rows and not rejects:
                return
            seq += 1
            parts = root / layout.PARTS_DIR
            if rejects:
                layout.atomic_write_parquet(
                    pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA),
                    parts / f"rejects-{run}-{seq:06d}.parquet",
                )
            if rows:
                layout.atomic_write_parquet(
                    pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA),
                    parts / f"manifest-{run}-{seq:06d}.parquet",
                )
            rows, rejects = [], []

        from tqdm import tqdm

        bar = tqdm(unit="img", desc="ingest", disable=not cfg.progress, smoothing=0.05)
        pending = 0
        for status, row in _results(todo(), cfg):
            if status == "ok":
                if row["id"] in ids:
                    summary.duplicates += 1
                    rejects.append(
                        {
                            **_reject_row(_as_item(row), "duplicate", "same bytes as an ingested image"),
                            "id": row["id"],
                        }
                    )
                else:
                    ids.add(row["id"])
                    rows.append(row)
                    summary.new += 1
            else:
                summary.rejects[row["reason"]] += 1
                rejects.append(row)
            pending += 1
            bar.update(1)
            if pending >= cfg.commit_every:
                commit()
                pending = 0
        commit()
        bar.close()
        fold_parts(root)
        summary.total_images = len(ids)
    summary.seconds = time.perf_counter() - t0
    return summary


def _as_item(row: dict[str, Any]):
    from bigasp.prep.sources import Ref

    return Item(row["path"], Ref(row["path"], row["tar_offset"], row["file_size"]), row["mtime"])
