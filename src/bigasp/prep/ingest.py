"""`bigasp ingest`: make DATASET/manifest.parquet reflect the images of the sources.

State: `sources.parquet` holds one row per accepted source path (a file or a tar member) with
its change key (image and sidecar sizes + mtimes) and what its sidecars said; `rejects.parquet`
one row per rejected path with its reason. The manifest is derived from `sources.parquet`:
one row per content id, the copies of one image merged (see `merge_copies`). Because it is a
pure function of per-path results, it does not depend on scan order or worker count.

Incremental: a path whose change key is unchanged is reused without reading it; a reject is
also retried when a setting its reason depends on changed (`--allow-upscale` for too_small,
...) or with `retry_rejects`. A path found through one of this run's sources before but gone
now is removed (`prune`). Replaced content gets a new id (id = content hash), so its old
latents no longer join the manifest and `bigasp encode` encodes the new bytes.

Sources may be URLs (`bigasp.prep.urlsources`); under torchrun / SLURM each rank examines its
own share and rank 0 folds every rank's parts (`bigasp.prep.ingest_ranks`).

Crash safety: results are committed in parts (`parts/*.parquet`, each written atomically)
every `commit_every` images, and folded into sources / rejects / manifest at the end (or at
the start of the next run, if this one died). A killed run loses at most the uncommitted part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bigasp.buckets import BucketConfig, BucketSet
from bigasp.errors import ConfigError, DataError
from bigasp.holdpoint import hold
from bigasp.prep import shardbook
from bigasp.prep.config import IngestConfig
from bigasp.prep.images import Reject, pixel_limit, probe
from bigasp.prep.kohya import folder_repeats, reading_key
from bigasp.prep.sidecar import check_download, parse_sidecars, status_failed
from bigasp.prep.sources import (
    CHUNK,
    LIST_EXT,
    PARQUET_EXT,
    Item,
    Ref,
    expand_patterns,
    is_pattern,
    printable,
    resolve_source,
    scan,
    unit_of,
)
from bigasp.store import layout, remote, workcopy
from bigasp.store.manifest import (
    MANIFEST_FIX,
    MANIFEST_SCHEMA,
    REJECTS_FIX,
    REJECTS_SCHEMA,
    SOURCES,
    SOURCES_SCHEMA,
    conform,
    init_dataset,
    load_dataset_json,
    manifest_lock,
)

log = logging.getLogger(__name__)

MAX_SIDECAR_BYTES = 16 << 20

# Settings each reject reason depends on: such a reject is examined again when one changes, so
# the fix a reject message suggests (e.g. `--allow-upscale keeps it`) works on a plain re-run.
REASON_SETTINGS: dict[str, tuple[str, ...]] = {
    "too_small": ("allow_upscale", "buckets"),
    "too_large": ("max_pixels", "max_file_size"),
    "animated": ("animated",),
    "truncated": ("verify",),
    "corrupt": ("verify",),
    "bad_parquet": ("parquet_image_column",),
    "checksum_mismatch": ("checksums",),
}


def content_id(data: bytes) -> str:
    """Stable image id: blake2b-128 of the file bytes (same photo under two names = one id)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_ingested(ref: Ref, image_id: str | None) -> bytes:
    """An ingested image's bytes, checked against its id (the content hash) unless `image_id` is
    None; shared by every stage that re-reads the photos (encode, annotate)."""
    try:
        data = ref.read()
    except FileNotFoundError as err:
        reason = "missing" if remote.is_url(ref.file) else "unreadable"
        raise Reject(reason, str(err)) from None
    except OSError as err:
        raise Reject("unreadable", str(err)) from None
    if image_id is not None and content_id(data) != image_id:
        raise Reject("changed_since_ingest", "file bytes no longer match the manifest id; re-run ingest")
    return data


def reason_settings(reason: str, cfg: IngestConfig) -> str:
    keys = REASON_SETTINGS.get(reason, ())
    dump = cfg.model_dump(include=set(keys))
    return json.dumps(dump, sort_keys=True)


class IngestInterrupted(KeyboardInterrupt):
    """Ctrl-C: what was examined before it is committed; `summary` says how much."""

    def __init__(self, summary: IngestSummary):
        super().__init__("ingest interrupted")
        self.summary = summary


@dataclass
class IngestSummary:
    scanned: int = 0
    new: int = 0  # accepted paths holding an image the dataset did not have
    updated: int = 0  # known paths whose file or sidecars changed (re-read)
    skipped: int = 0  # unchanged since an earlier run: reused without reading
    duplicates: int = 0  # new paths holding an image the dataset already has (metadata merged)
    retried: int = 0  # earlier rejects examined again (input or a setting changed, or retry_rejects)
    removed: int = 0  # paths gone from this run's sources, removed from the dataset (prune)
    retries: int = 0  # transient object-storage failures retried (sources at URLs)
    fetched: int = 0  # bytes fetched from URLs
    rejects: Counter = field(default_factory=Counter)  # reason -> count
    seconds: float = 0.0
    total_images: int = 0  # manifest rows after this run
    interrupted: bool = False

    @property
    def images_per_second(self) -> float:
        return (self.scanned - self.skipped) / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "scanned": self.scanned,
            "new": self.new,
            "updated": self.updated,
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "retried": self.retried,
            "removed": self.removed,
            "retries": self.retries,
            "fetched": self.fetched,
            "rejects": dict(sorted(self.rejects.items())),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 1),
            "total_images": self.total_images,
            "interrupted": self.interrupted,
        }


def item_key(item: Item, cfg: IngestConfig) -> str:
    """What must stay equal for an earlier result of `item` to be reused: its files' change key and
    how they are read (the .txt as tags, kohya folder repeats, Parquet column names, checksums)."""
    key = reading_key(
        item.change_key, cfg.txt_tags, folder_repeats(item.path, item.origin, cfg.kohya_repeats)
    )
    return _metadata_key(item, cfg, key)


def _metadata_key(item: Item, cfg: IngestConfig, key: str) -> str:
    """`key` extended by the settings that change how a JSON sidecar or a Parquet row's columns
    are read; unchanged for the defaults, so datasets ingested before these settings keep their keys."""
    salt: list[Any] = []
    if item.data.row is not None and cfg.parquet_columns:
        salt.append(sorted(cfg.parquet_columns.items()))
    if (item.json is not None or item.data.row is not None) and cfg.checksums != "auto":
        salt.append(cfg.checksums)
    if not salt:
        return key
    return hashlib.blake2b(repr((key, salt)).encode(), digest_size=12).hexdigest()


def _reject_row(item: Item, reason: str, detail: str, cfg: IngestConfig) -> dict[str, Any]:
    return {
        "path": item.path,
        "reason": reason,
        "detail": printable(detail),  # OS errors quote raw file names, which may not be UTF-8
        "file_size": item.data.size,
        "mtime": item.mtime,
        "id": None,
        "stage": "ingest",
        "origin": item.origin,
        "change_key": item_key(item, cfg),
        "settings": reason_settings(reason, cfg),
    }


STREAM_ABOVE = 16 << 20  # files larger than this are hashed and probed in pieces


def _hash_and_probe(item: Item, cfg: IngestConfig, sha256: Any = None):
    """Content id and header facts. Small files are read once into memory (fastest); larger
    ones are streamed, so a multi-GB file never sits in memory. `sha256`: a hashlib object that
    is fed the same bytes (for a sidecar's checksum), or None."""
    try:
        f = item.data.open()
    except FileNotFoundError as err:
        if remote.is_url(item.data.file):
            raise Reject("missing", f"object not found ({err}); it was deleted since it was listed") from None
        raise Reject("unreadable", str(err)) from None
    except OSError as err:
        raise Reject("unreadable", str(err)) from None
    with f:
        h = hashlib.blake2b(digest_size=16)
        n = 0
        try:
            if item.data.size <= STREAM_ABOVE:
                data = f.read(item.data.size + 1)  # +1: a file that grew is caught below
                h.update(data)
                if sha256 is not None:
                    sha256.update(data)
                n = len(data)
            else:
                data = None
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    if sha256 is not None:
                        sha256.update(chunk)
                    n += len(chunk)
        except OSError as err:
            raise Reject("unreadable", str(err)) from None
        if n != item.data.size:
            raise Reject("unreadable", f"read {n} of {item.data.size} bytes (file changed while reading?)")
        info = probe(
            data if data is not None else f,
            name=item.path,
            size=n,
            max_pixels=cfg.max_pixels,
            animated=cfg.animated,
            verify=cfg.verify,
        )
    return h.hexdigest(), info


def _sidecar(ref) -> bytes | None:
    if ref is None:
        return None
    if ref.size > MAX_SIDECAR_BYTES:
        raise Reject(
            "bad_sidecar",
            f"{printable(ref.file)}: {ref.size} bytes, larger than {MAX_SIDECAR_BYTES} (16 MiB)",
        )
    return ref.read()


def examine(item: Item, cfg: IngestConfig, buckets: BucketSet) -> tuple[str, dict[str, Any]]:
    """("ok", sources row) or ("reject", rejects row) for one item; never raises for bad input."""
    try:
        return _examine(item, cfg, buckets)
    except Reject as r:
        return "reject", _reject_row(item, r.reason, r.detail, cfg)
    except remote.RemoteAccessError:
        raise  # credentials or permissions: every other image would fail alike; stop with one line
    except Exception as err:  # a bug, not bad input: record it and keep the run going
        log.debug("examining %s failed", item.path, exc_info=True)
        return "reject", _reject_row(
            item,
            "internal_error",
            f"{type(err).__name__}: {err} (a bug in bigasp: please report it with this file)",
            cfg,
        )


def _too_large(size: int, cfg: IngestConfig) -> None:
    if size > cfg.max_file_size:
        raise Reject(
            "too_large",
            f"file is {size} bytes, over max_file_size={cfg.max_file_size} (--max-file-size {size} keeps it)",
        )


def _examine(item: Item, cfg: IngestConfig, buckets: BucketSet) -> tuple[str, dict[str, Any]]:
    if item.problem:
        raise Reject(item.problem, item.error)
    if item.missing:
        raise Reject("unreadable", item.error or "listed path does not exist")
    if item.data.row is not None:
        return _examine_row(item, cfg, buckets)
    _too_large(item.data.size, cfg)
    early = _peek(item.json)  # only to know whether the image's sha256 is needed
    sha = hashlib.sha256() if early is not None and b'"sha256"' in early else None
    iid, info = _hash_and_probe(item, cfg, sha)
    _fits(info, cfg, buckets)
    try:
        txt, js, caption = (
            _sidecar(item.txt),
            early if early is not None else _sidecar(item.json),
            _sidecar(item.caption),
        )
    except OSError as err:
        raise Reject("bad_sidecar", f"cannot read sidecar: {err}") from None
    json_name = printable(item.json.file) if item.json else ""
    if item.json is not None and item.json.offset is not None:  # a tar member's sidecar
        json_name = f"{printable(item.path).rsplit('.', 1)[0]}.json"
    ann = parse_sidecars(
        txt,
        js,
        txt_name=printable(item.txt.file) if item.txt else "",
        json_name=json_name,
        caption=caption,
        caption_name=printable(item.caption.file) if item.caption else "",
        txt_tags=cfg.txt_tags,
    )
    check_download(ann.extra, json_name, sha.hexdigest() if sha is not None else None, cfg.checksums)
    return "ok", _row(item, cfg, iid, item.data.size, info, ann)


def _peek(ref: Ref | None) -> bytes | None:
    """A JSON sidecar's bytes, or None when there is none or it cannot be read now (then the
    ordinary sidecar read below reports it, in the usual order)."""
    try:
        return _sidecar(ref)
    except (Reject, OSError):
        return None


def _fits(info, cfg: IngestConfig, buckets: BucketSet) -> None:
    if not cfg.allow_upscale and not buckets.fits_without_upscale(info.height, info.width):
        b = buckets.nearest(info.height, info.width)
        raise Reject(
            "too_small",
            f"{info.width}x{info.height} is smaller than its bucket {b.width}x{b.height} (--allow-upscale keeps it)",
        )


def _examine_row(item: Item, cfg: IngestConfig, buckets: BucketSet) -> tuple[str, dict[str, Any]]:
    """A Parquet row: its other columns are its JSON sidecar (read first, so a failed download's
    row says so rather than `missing_image`), the image cell its bytes."""
    from bigasp.prep.parquet import row_sidecar

    ref = item.data
    name = f"{printable(ref.file)} row {ref.row}"
    try:
        js = row_sidecar(ref.file, ref.row or 0, ref.column or "", cfg.parquet_columns)
    except OSError as err:
        raise Reject("unreadable", str(err)) from None
    ann = parse_sidecars(None, js, json_name=name, txt_tags=cfg.txt_tags)
    status_failed(ann.extra, name)
    data = read_ingested(ref, None)
    _too_large(len(data), cfg)
    try:
        info = probe(
            data,
            name=item.path,
            size=len(data),
            max_pixels=cfg.max_pixels,
            animated=cfg.animated,
            verify=cfg.verify,
        )
    except Reject as r:
        if r.reason != "unsupported_format":
            raise
        raise Reject(  # the extension-based detail means nothing for a cell
            r.reason,
            f"{name}, column {ref.column!r}: {len(data)} bytes that are no image format Pillow can open; "
            "the image column must hold image file bytes (JPEG, PNG, WebP, ...): check --image-column",
        ) from None
    _fits(info, cfg, buckets)
    want = "sha256" in ann.extra and ann.extra["sha256"] is not None and cfg.checksums != "off"
    check_download(ann.extra, name, hashlib.sha256(data).hexdigest() if want else None, cfg.checksums)
    return "ok", _row(item, cfg, content_id(data), len(data), info, ann)


def _row(item: Item, cfg: IngestConfig, iid: str, size: int, info, ann) -> dict[str, Any]:
    group = folder_repeats(item.path, item.origin, cfg.kohya_repeats)
    if group is not None:
        ann.source = ann.source if ann.source is not None else group[0]
        ann.extra.setdefault("repeats", group[1])
    return {
        "path": item.path,
        "origin": item.origin,
        "change_key": item_key(item, cfg),
        "id": iid,
        "tar_offset": item.data.offset,
        "file_size": size,
        "mtime": item.mtime,
        "row": item.data.row,
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
        "extra": json.dumps(ann.extra, sort_keys=True, ensure_ascii=False, allow_nan=False),
    }


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


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


def _results(items: Iterator[Item], cfg: IngestConfig) -> Iterator[tuple[Item, tuple[str, dict[str, Any]]]]:
    fn = _Examiner(cfg)
    if cfg.workers <= 1:
        with pixel_limit(cfg.max_pixels):
            for item in items:
                yield item, examine(item, cfg, fn.buckets)
        return
    import itertools
    import multiprocessing as mp

    with mp.get_context("fork").Pool(cfg.workers, initializer=_worker_init) as pool:
        # Pool.imap drains its input eagerly; feed bounded chunks so memory stays flat.
        while chunk := list(itertools.islice(items, 4096)):
            yield from zip(chunk, pool.imap(fn, chunk, chunksize=64), strict=True)


# --- the manifest: one row per id, copies merged ---------------------------------------------


_MANIFEST_COLUMNS = frozenset(MANIFEST_SCHEMA.names)


def merge_copies(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One manifest row from the sources rows of one id (identical bytes under several paths).

    Rule (documented in docs/datasets.md): copies are taken in path order; `path`, the file
    facts and `tar_offset` come from the first; captions and tags are the union, first seen
    first; score and source come from the first copy that has one; watermark is true if any
    copy says true; `extra` keys from an earlier copy win.
    """
    rows = sorted(rows, key=lambda r: r["path"])
    out = {k: v for k, v in rows[0].items() if k in _MANIFEST_COLUMNS}
    captions: dict[str, None] = {}
    tags: dict[str, None] = {}
    extra: dict[str, Any] = {}
    for r in rows:
        captions.update(dict.fromkeys(r["captions"] or []))
        tags.update(dict.fromkeys(r["tags"] or []))
        for k, v in json.loads(r["extra"] or "{}").items():
            extra.setdefault(k, v)
    out["captions"], out["tags"] = list(captions), list(tags)
    out["score"] = next((r["score"] for r in rows if r["score"] is not None), None)
    out["source"] = next((r["source"] for r in rows if r["source"] is not None), None)
    marks = [r["watermark"] for r in rows if r["watermark"] is not None]
    out["watermark"] = any(marks) if marks else None
    out["extra"] = json.dumps(extra, sort_keys=True, ensure_ascii=False)
    out["paths"] = [r["path"] for r in rows]
    return out


def build_manifest(sources: pa.Table) -> pa.Table:
    """Group sources rows by id; single copies are taken as they are (vectorised), copies merged."""
    if len(sources) == 0:
        return MANIFEST_SCHEMA.empty_table()
    t = sources.sort_by([("id", "ascending"), ("path", "ascending")]).combine_chunks()
    ids = t.column("id").to_numpy(zero_copy_only=False)
    n = len(ids)
    first = np.ones(n, bool)
    first[1:] = ids[1:] != ids[:-1]
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], n)
    base = t.take(pa.array(starts))
    paths = pa.ListArray.from_arrays(
        pa.array(np.append(starts, n), pa.int32()), t.column("path").combine_chunks()
    )
    cols = {name: base.column(name) for name in MANIFEST_SCHEMA.names if name != "paths"}
    cols["paths"] = paths
    manifest = pa.Table.from_pydict(cols, schema=MANIFEST_SCHEMA)
    multi = np.flatnonzero(ends - starts > 1)
    if len(multi) == 0:
        return manifest
    sizes = (ends - starts)[multi]
    rows = t.take(pa.array(np.concatenate([np.arange(starts[g], ends[g]) for g in multi]))).to_pylist()
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    merged = [merge_copies(rows[bounds[i] : bounds[i + 1]]) for i in range(len(multi))]
    single = np.ones(len(manifest), bool)
    single[multi] = False
    out = pa.concat_tables(
        [manifest.filter(pa.array(single)), pa.Table.from_pylist(merged, schema=MANIFEST_SCHEMA)]
    )
    return out.sort_by("id")


# --- parts: the crash-safe commit log -------------------------------------------------------


def _parts(root: Path, kind: str) -> list[Path]:
    d = root / layout.PARTS_DIR
    return sorted(p for p in d.glob(f"{kind}-*.parquet") if layout.visible(p.name)) if d.is_dir() else []


def _read(path: Path, schema: pa.Schema) -> pa.Table:
    import pyarrow.parquet as pq

    with layout.parquet_reading(path, _FIX.get(path.name, layout.GENERIC_FIX)):
        return conform(pq.read_table(path), schema)


_FIX = {
    SOURCES: "restore it from a backup, or ingest the sources into a new dataset folder",
    layout.REJECTS: REJECTS_FIX,
    layout.MANIFEST: MANIFEST_FIX,
}


def _old_sources(root: Path) -> pa.Table:
    """sources.parquet, or for a dataset written before it existed, one row per manifest row.

    Migrated rows have no change key, so the next run reads them once again.
    """
    spath, mpath = root / SOURCES, root / layout.MANIFEST
    if spath.exists():
        return _read(spath, SOURCES_SCHEMA)
    if mpath.exists():
        return conform(_read(mpath, MANIFEST_SCHEMA).drop_columns(["paths"]), SOURCES_SCHEMA)
    return SOURCES_SCHEMA.empty_table()


def _latest_per_path(tables: list[tuple[pa.Table, int, int]]) -> dict[int, np.ndarray]:
    """For (table, kind, seq) triples: per kind, the row indices whose path has no later row."""
    keys = pa.Table.from_arrays(
        [
            pa.chunked_array(
                [t.column("path").cast(pa.string()).combine_chunks() for t, _, _ in tables], pa.string()
            ),
            pa.chunked_array([pa.array(np.full(len(t), s, np.int64)) for t, _, s in tables]),
            pa.chunked_array([pa.array(np.full(len(t), k, np.int8)) for t, k, _ in tables]),
            pa.chunked_array([pa.array(np.arange(len(t), dtype=np.int64)) for t, _, _ in tables]),
            pa.chunked_array([pa.array(np.full(len(t), i, np.int32)) for i, (t, _, _) in enumerate(tables)]),
        ],
        names=["path", "seq", "kind", "row", "table"],
    )
    keys = keys.sort_by([("path", "ascending"), ("seq", "descending")]).combine_chunks()
    paths = keys.column("path")
    if len(keys) > 1:
        keep = pa.concat_arrays(
            [pa.array([True]), pc.not_equal(paths.slice(1), paths.slice(0, len(keys) - 1)).combine_chunks()]
        )
        keys = keys.filter(keep)
    return {
        i: keys.filter(pc.equal(keys.column("table"), i)).column("row").to_numpy() for i in range(len(tables))
    }


def fold_parts(root: Path, prune: Callable[[str, str | None], bool] | None = None) -> int:
    """Merge committed parts into sources / rejects, rebuild the manifest, delete the parts.

    `prune(path, origin)` True = the path is gone from the sources: drop its row. Returns how many
    rows were pruned. The manifest is written last: it is the commit point.
    """
    sparts, rparts = _parts(root, "sources"), _parts(root, "rejects")
    hparts = _parts(root, "shards")  # tar shards at URLs read whole
    legacy = _parts(root, "manifest")  # parts left by a version before sources.parquet
    spath, rpath, mpath = root / SOURCES, root / layout.REJECTS, root / layout.MANIFEST
    in_step = _generation(spath) == _generation(mpath)  # both missing, or written together
    if not (sparts or rparts or hparts or legacy or prune) and in_step:
        return 0
    order = {
        p: i + 1
        for i, p in enumerate(sorted([*sparts, *rparts, *legacy], key=lambda p: p.name.split("-", 1)[1]))
    }
    tables = [(_old_sources(root), 0, 0)]
    tables += [
        (conform(_read(p, MANIFEST_SCHEMA).drop_columns(["paths"]), SOURCES_SCHEMA), 0, order[p])
        for p in legacy
    ]
    tables += [(_read(p, SOURCES_SCHEMA), 0, order[p]) for p in sparts]
    tables.append((_read(rpath, REJECTS_SCHEMA) if rpath.exists() else REJECTS_SCHEMA.empty_table(), 1, 0))
    tables += [(_read(p, REJECTS_SCHEMA), 1, order[p]) for p in rparts]
    rows = _latest_per_path(tables)
    srcs = [t.take(pa.array(rows[i])) for i, (t, k, _) in enumerate(tables) if k == 0]
    rejs = [t.take(pa.array(rows[i])) for i, (t, k, _) in enumerate(tables) if k == 1]
    sources = pa.concat_tables(srcs).sort_by("path")
    rejects = pa.concat_tables(rejs).sort_by("path")
    pruned = 0
    if prune is not None:
        for name in ("sources", "rejects"):
            t = sources if name == "sources" else rejects
            pairs = zip(t.column("path").to_pylist(), t.column("origin").to_pylist(), strict=True)
            drop = np.fromiter((prune(p, o) for p, o in pairs), bool, len(t))
            pruned += int(drop.sum())
            t = t.filter(pa.array(~drop))
            if name == "sources":
                sources = t
            else:
                rejects = t
    shards_gone = (lambda u: prune(f"{u}::", None)) if prune is not None else None
    if not (sparts or rparts or legacy or pruned) and in_step and spath.exists():
        if hparts or (shards_gone and any(map(shards_gone, shardbook.load(root)))):
            shardbook.fold(root, hparts, shards_gone)
            for p in hparts:
                p.unlink()
        return 0  # nothing else changed: keep the files (a no-op re-run writes nothing)
    # sources and manifest carry one generation token: a crash between their writes is seen
    # (tokens differ) and the next run rebuilds the manifest even if nothing else changed.
    gen = {b"bigasp.generation": uuid.uuid4().hex.encode()}
    layout.atomic_write_parquet(sources.replace_schema_metadata(gen), spath)
    layout.atomic_write_parquet(rejects, rpath)
    shardbook.fold(root, hparts, shards_gone)
    from bigasp.annotate.merge import reapply  # merged annotations survive the rebuild

    manifest = reapply(root, build_manifest(sources).replace_schema_metadata(gen))
    layout.atomic_write_parquet(manifest, mpath)  # commit point
    for p in sparts + rparts + hparts + legacy:
        p.unlink()
    return pruned


def _fold(root: Path, prune: Callable[[str, str | None], bool] | None = None) -> int:
    """`fold_parts`, with a failed write (a full disk) said in one line with what is kept."""
    try:
        return fold_parts(root, prune)
    except OSError as err:
        raise layout.write_failed(
            err, root, f"the committed parts in {root / layout.PARTS_DIR} and the previous manifest are kept",
            "run the same `bigasp ingest` command again: it folds the parts in",
        ) from None  # fmt: skip


def _generation(path: Path) -> bytes | None:
    """The generation token shared by sources.parquet and the manifest written with it; a
    damaged manifest (that sources.parquet can rebuild) has none, so the next fold rewrites it."""
    import pyarrow.parquet as pq

    if not path.exists():
        return None
    if path.name == layout.MANIFEST and (path.parent / SOURCES).exists():
        try:
            return (pq.read_schema(path).metadata or {}).get(b"bigasp.generation")
        except pa.ArrowException:
            log.warning("%s is damaged; rebuilding it from %s", path, path.parent / SOURCES)
            return b"damaged"
    with layout.parquet_reading(path, _FIX.get(path.name, layout.GENERIC_FIX)):
        return (pq.read_schema(path).metadata or {}).get(b"bigasp.generation")


def _digest(path: str) -> bytes:
    """16-byte digest of a path: ~50 bytes per file in memory instead of ~250."""
    return hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=16).digest()


@dataclass
class _Known:
    ids: set[str]
    accepted: dict[bytes, str | None]  # path digest -> change key
    rejected: dict[bytes, tuple[str | None, str, str | None]]  # path digest -> (change key, reason, settings)
    shards: dict[str, shardbook.Record] = field(default_factory=dict)  # tar shards at URLs read whole


def _known(root: Path) -> _Known:
    sources = _old_sources(root).select(["path", "change_key", "id"])
    accepted = dict(
        zip(
            map(_digest, sources.column("path").to_pylist()),
            sources.column("change_key").to_pylist(),
            strict=True,
        )
    )
    rejected = {}
    rpath = root / layout.REJECTS
    if rpath.exists():
        t = _read(rpath, REJECTS_SCHEMA)
        cols = [t.column(c).to_pylist() for c in ("path", "change_key", "reason", "settings")]
        rejected = {_digest(p): (k, r, s) for p, k, r, s in zip(*cols, strict=True)}
    return _Known(set(sources.column("id").to_pylist()), accepted, rejected, shardbook.load(root))


def shard_settings(cfg: IngestConfig) -> str | None:
    """The settings a tar shard's members were read with (None: every shard must be read again)."""
    if cfg.retry_rejects:
        return None
    keys = {"txt_tags", "kohya_repeats", *(k for ks in REASON_SETTINGS.values() for k in ks)}
    return json.dumps(cfg.model_dump(include=keys), sort_keys=True)


def gone_from(
    in_scope: Callable[[str, str | None], bool], seen: set[bytes]
) -> Callable[[str, str | None], bool]:
    """A recorded path is gone when one of this run's sources covers it and the scan did not see
    it, nor its unit (a tar shard skipped whole because it is unchanged: `URL::*` in `seen`)."""
    return lambda p, o: in_scope(p, o) and _digest(p) not in seen and _digest(f"{unit_of(p)}::*") not in seen


def _resolve_buckets(root: Path, cfg: IngestConfig) -> IngestConfig:
    """Unset buckets = the dataset's recorded rule, so a plain re-run never changes the rule."""
    path = root / layout.DATASET_JSON
    recorded = load_dataset_json(path.read_bytes(), path).get("buckets") if path.exists() else None
    if recorded:
        from bigasp.config import validate

        recorded_rule = validate(BucketConfig, recorded, f"{path} (buckets)")
    if cfg.buckets is None:
        rule = recorded_rule if recorded else BucketConfig()
        return cfg.model_copy(update={"buckets": rule})
    if recorded and recorded_rule != cfg.buckets:
        log.warning(
            "%s was ingested with buckets %s; switching to %s (latents already encoded keep their buckets)",
            root,
            recorded,
            cfg.buckets.model_dump(),
        )
    return cfg


def _check_out(sources: list[Path | str], root: Path) -> None:
    out = root.resolve()
    for src in sources:
        if isinstance(src, str):
            continue  # a URL: never the local output folder
        s = src.resolve()
        if s.is_dir() and (out == s or s in out.parents):
            raise DataError(
                f"--out {root} is inside the source folder {src}: the dataset's own files would be "
                "ingested as images on the next run; choose an output folder outside the sources"
            )


def _make_out(root: Path) -> None:
    """Create the dataset folder, or say in one line why `--out` cannot be one."""
    if root.exists() and not root.is_dir():
        raise ConfigError(
            f"--out must be a folder: {printable(str(root))} is a file; give a folder for the dataset "
            "(it is created if missing)"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"--out must be a folder bigasp can create: {printable(str(root))}: {err.strerror or err}; "
            "give a writable folder"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--out must be a folder bigasp can write: {printable(str(root))} is not writable "
            "(permissions or a read-only file system); give a writable folder"
        )


def _scope(sources: list[Path | str], patterns: list[str] | None = None) -> Callable[[str, str | None], bool]:
    """Whether a recorded (path, origin) belongs to one of this run's sources (so it may be pruned).

    Folders and tars by path prefix (so re-ingesting a sub-folder prunes only under it); path
    lists by the origin recorded with each row, since a list's entries can live anywhere; glob
    patterns by matching the file part (before `::`), so a file that no longer matches is pruned.
    """
    prefixes: list[str] = []
    exact: set[str] = set()
    lists: set[str] = set()
    for p in sources:
        if isinstance(p, str):  # a URL: its prefix, its shards' members, or itself
            from bigasp.prep.urlsources import scope_prefixes

            for pre in scope_prefixes(p):
                if pre.endswith(("/", "::")):
                    prefixes.append(pre)
                else:
                    exact.add(pre)
            continue
        if p.is_dir():
            prefixes.append(str(p).rstrip("/") + "/")
        elif p.suffix.lower() in (".tar", *PARQUET_EXT):  # members / rows are "source::..."
            prefixes.append(f"{p}::")
        elif p.suffix.lower() in LIST_EXT:
            lists.add(str(p))
        else:
            exact.add(str(p))
    tup = tuple(prefixes)
    if patterns:
        import re

        regex = re.compile("|".join(_glob_regex(p) for p in patterns))
        return lambda path, origin: (
            path in exact
            or origin in lists
            or path.startswith(tup)
            or bool(regex.fullmatch(path.split("::", 1)[0]))
        )
    return lambda path, origin: path in exact or origin in lists or path.startswith(tup)


def _glob_regex(pattern: str) -> str:
    """A glob pattern as a regex with glob's meaning: `*` and `?` stay within a folder, `**/`
    spans folders, `[...]` is a character class."""
    import re

    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 1 :]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1 : j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = j + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def ingest(
    sources: Iterable[str | os.PathLike], out: str | os.PathLike, cfg: IngestConfig | None = None
) -> IngestSummary:
    """Scan `sources` into the dataset directory `out`; returns counts (also for benchmarks).

    Under torchrun or SLURM (several ranks) each rank examines only its share of the sources
    and rank 0 folds every rank's parts into the one dataset (see `bigasp.prep.ingest_ranks`).
    """
    cfg = cfg or IngestConfig()
    sources = list(sources)
    patterns = [str(resolve_source(s)) for s in sources if is_pattern(s)]
    sources = expand_patterns(sources)
    remote.configure(cfg.storage_options)
    resolved = _resolve(sources)
    from bigasp.workshare import dist_env, summary_group

    rank, world, _ = dist_env()
    url = str(out).rstrip("/") if remote.is_url(str(out)) else None
    root = workcopy.work_dir(url, cfg.work_dir) if url else Path(out)
    if url and rank == 0:  # rank 0 holds the dataset: it alone reads and writes the URL
        workcopy.pull(url, root, cfg.storage_options)
        if merged := _merged_stages(root):  # the rebuilt manifest takes the recorded merge again
            workcopy.pull(url, root, cfg.storage_options, annotations=merged)
    if world > 1 and summary_group(world, "ingest"):
        from bigasp.prep.ingest_ranks import ingest_ranked

        summary = ingest_ranked(sources, resolved, root, cfg, rank, world, patterns)
        if url and rank == 0:
            workcopy.push(url, root, cfg.storage_options)
        return summary
    try:
        summary = _ingest_here(sources, resolved, patterns, root, cfg)
    except IngestInterrupted:
        if url:  # what Ctrl-C committed is in the working copy's tables: the URL gets it too
            workcopy.push(url, root, cfg.storage_options)
        raise
    if url:
        workcopy.push(url, root, cfg.storage_options)
    return summary


def _merged_stages(root: Path) -> list[str]:
    """The annotation stages whose results `annotate merge` put in this dataset's manifest."""
    from bigasp.annotate.merge import SOURCES as MERGE_SOURCES

    path = root / layout.DATASET_JSON
    if not path.exists():
        return []
    columns = (json.loads(path.read_text()).get("annotations") or {}).get("columns") or {}
    return sorted({MERGE_SOURCES[c][0] for c in columns if c in MERGE_SOURCES})


def _ingest_here(
    sources: list, resolved: list, patterns: list[str], root: Path, cfg: IngestConfig
) -> IngestSummary:
    """One process's `ingest` into the local dataset folder `root`."""
    _check_out(resolved, root)
    _make_out(root)
    before = remote.stats()
    t0 = time.perf_counter()
    summary = IngestSummary()
    with manifest_lock(root, holder="another `bigasp ingest`, `annotate merge` or `quality score`"):
        cfg = prepare(root, cfg)
        known = _known(root)
        run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        try:
            seen = examine_all(sources, cfg, known, root / layout.PARTS_DIR, run, summary)
        except KeyboardInterrupt:
            _fold(root)
            summary.interrupted = True
            summary.total_images = _count(root)
            summary.seconds = time.perf_counter() - t0
            raise IngestInterrupted(summary) from None
        gone = gone_from(_scope(resolved, patterns), seen) if cfg.prune else None
        summary.removed = _fold(root, prune=gone)
        summary.total_images = _count(root)
    summary.seconds = time.perf_counter() - t0
    _fetch_stats(summary, before)
    return summary


def _resolve(sources: list) -> list[Path | str]:
    """Local sources as absolute paths (checked to exist), URLs as given; before anything is written."""
    resolved: list[Path | str] = [str(s) if remote.is_url(str(s)) else resolve_source(s) for s in sources]
    for src, p in zip(sources, resolved, strict=True):
        if isinstance(p, Path) and not p.exists():
            raise DataError(
                f"ingest source {printable(str(src))} does not exist (expected a folder, a .tar or a list of paths)"
            )
    return resolved


def _fetch_stats(summary: IngestSummary, before: dict[str, int]) -> None:
    after = remote.stats()
    summary.retries = after["retries"] - before["retries"]
    summary.fetched = after["bytes"] - before["bytes"]
    if summary.retries:
        log.warning("ingest: %d transient object-storage failure(s) retried", summary.retries)


def prepare(root: Path, cfg: IngestConfig) -> IngestConfig:
    """Under the manifest lock: the bucket rule settled, dataset.json written, a dead run's parts folded."""
    cfg = _resolve_buckets(root, cfg)
    init_dataset(
        root,
        {
            "buckets": cfg.buckets.model_dump(),
            "ingest": cfg.model_dump(exclude={"buckets", "storage_options", "work_dir"}),
        },
    )
    _fold(root)  # a previous run that died left committed parts: keep them
    return cfg


def examine_all(
    sources: list,
    cfg: IngestConfig,
    known: _Known,
    parts: Path,
    run: str,
    summary: IngestSummary,
    owns: Callable[[str], bool] | None = None,
) -> set[bytes]:
    """Examine what changed among the (owned share of the) sources' items, committing results as
    parts in `parts` every `commit_every`; returns the digests of every path seen. Ctrl-C commits
    what was examined and re-raises."""
    seen: set[bytes] = set()
    settings_now: dict[str, str] = {}
    book = shardbook.Book(known.shards, shard_settings(cfg))
    fed = [0]  # items handed to the examiners
    waiting: list[tuple[int, dict]] = []  # shard records, each due once its members are committed

    def unchanged_reject(entry: tuple[str | None, str, str | None], key: str) -> bool:
        ck, reason, settings = entry
        if cfg.retry_rejects or ck != key:
            return False
        if reason not in settings_now:
            settings_now[reason] = reason_settings(reason, cfg)
        return (settings or reason_settings(reason, cfg)) == settings_now[reason]

    def todo() -> Iterator[Item]:  # streamed: 10M+ files never sit in a list
        for item in scan(
            sources, owns, prefetch=cfg.prefetch, book=book, image_column=cfg.parquet_image_column
        ):
            while book.skipped:  # whole shards unchanged since they were read: counted, not fetched
                url, members = book.skipped.pop()
                seen.update((_digest(f"{url}::*"), _digest(f"{url}::")))
                summary.scanned += members
                summary.skipped += members
            while book.finished_rows:
                row = book.finished_rows.pop(0)
                seen.add(_digest(f"{row['url']}::"))
                waiting.append((fed[0], row))
            summary.scanned += 1
            d = _digest(item.path)
            seen.add(d)
            key = item_key(item, cfg)
            if (d in known.accepted and known.accepted[d] == key) or (
                d in known.rejected and unchanged_reject(known.rejected[d], key)
            ):
                summary.skipped += 1
            else:
                fed[0] += 1
                yield item
        while book.skipped:
            url, members = book.skipped.pop()
            seen.update((_digest(f"{url}::*"), _digest(f"{url}::")))
            summary.scanned += members
            summary.skipped += members
        for row in book.finished_rows:
            seen.add(_digest(f"{row['url']}::"))
            waiting.append((fed[0], row))
        book.finished_rows.clear()

    rows: list[dict] = []
    shard_rows: list[dict] = []
    got = [0]  # items whose results are in `rows` / `rejects`
    rejects: list[dict] = []
    seq = 0
    committed = [0]  # images written in parts by this run

    def commit() -> None:
        nonlocal seq, rows, rejects, shard_rows
        while waiting and waiting[0][0] <= got[0]:  # every member of that shard is in this commit
            shard_rows.append(waiting.pop(0)[1])
        if not rows and not rejects and not shard_rows:
            return
        seq += 1
        try:
            if rejects:
                layout.atomic_write_parquet(
                    pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA),
                    parts / f"rejects-{run}-{seq:06d}.parquet",
                )
            if rows:
                layout.atomic_write_parquet(
                    pa.Table.from_pylist(rows, schema=SOURCES_SCHEMA),
                    parts / f"sources-{run}-{seq:06d}.parquet",
                )
            if shard_rows:  # after the members' parts: a crash between them leaves the shard to re-read
                shardbook.write_part(shard_rows, parts / f"shards-{run}-{seq:06d}.parquet")
        except OSError as err:
            raise layout.write_failed(
                err, parts, f"the {committed[0]} image(s) this run committed before it (in {parts}) are kept",
                "run the same `bigasp ingest` command again to continue",
            ) from None  # fmt: skip
        committed[0] += len(rows) + len(rejects)
        rows, rejects, shard_rows = [], [], []

    from tqdm import tqdm

    bar = tqdm(unit="img", desc="ingest", disable=not cfg.progress, smoothing=0.05)
    pending = 0
    new_ids: set[str] = set()
    try:
        for item, (status, row) in _results(todo(), cfg):
            d = _digest(item.path)
            if d in known.rejected:
                summary.retried += 1
            if status == "ok":
                if d in known.accepted:
                    summary.updated += 1
                elif row["id"] in known.ids or row["id"] in new_ids:
                    summary.duplicates += 1
                else:
                    summary.new += 1
                new_ids.add(row["id"])
                rows.append(row)
            else:
                summary.rejects[row["reason"]] += 1
                rejects.append(row)
            pending += 1
            got[0] += 1
            bar.update(1)
            if pending >= cfg.commit_every:
                commit()
                pending = 0
                hold("ingest.committed")
    except KeyboardInterrupt:
        bar.close()
        commit()
        raise
    commit()
    bar.close()
    return seen


def _count(root: Path) -> int:
    import pyarrow.parquet as pq

    path = root / layout.MANIFEST
    return pq.read_metadata(path).num_rows if path.exists() else 0
