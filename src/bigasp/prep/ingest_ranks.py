"""`bigasp ingest` on many machines (torchrun / SLURM ranks) with no shared filesystem.

Every unit of work (a tar shard, or a file / object with its sidecars) belongs to one rank, by
a hash of its path or URL, so the split depends on neither the order of the sources nor how
they are listed; a rank never reads (nor, at a URL, fetches) a unit it does not own. Each rank
commits its results as parts on its own disk (`DATASET/parts/rank-NNNNN/`), then sends them
to rank 0, which folds them with its own into the one dataset; that fold is the same pure
function of per-path results as a one-rank run, so 1 and N ranks give the same manifest.

Rank 0 holds the dataset (sources / rejects / manifest) and gives each rank what it knew of
that rank's share, so an unchanged path is skipped on any rank. Killed at any point: a rank's
committed parts stay on its disk and count as done on the re-run (then are sent again), and
rank 0 folds what it had received at its next start; nothing is examined twice or lost.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

from bigasp.errors import BigaspError
from bigasp.prep import shardbook
from bigasp.prep.config import IngestConfig
from bigasp.prep.ingest import (
    IngestSummary,
    _check_out,
    _count,
    _digest,
    _fetch_stats,
    _fold,
    _Known,
    _make_out,
    _old_sources,
    _read,
    _scope,
    examine_all,
    gone_from,
    prepare,
)
from bigasp.prep.sources import unit_of
from bigasp.store import layout, remote
from bigasp.store.manifest import REJECTS_SCHEMA, SOURCES_SCHEMA, manifest_lock


def owner(unit: str, world: int) -> int:
    """The rank that examines `unit` (a tar, file or object path / URL)."""
    h = hashlib.blake2b(unit.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(h, "big") % world


class _Share:
    """What the dataset knew of one rank's units: the skip state and (path, origin) for pruning."""

    def __init__(self) -> None:
        self.known = _Known(set(), {}, {})
        self.paths: list[tuple[str, str | None]] = []


def _shares(root: Path, world: int) -> list[_Share]:
    shares = [_Share() for _ in range(world)]
    for url, rec in shardbook.load(root).items():
        sh = shares[owner(url, world)]
        sh.known.shards[url] = rec
        sh.paths.append((f"{url}::", None))
    src = _old_sources(root).select(["path", "origin", "change_key", "id"]).to_pydict()
    for p, o, k, i in zip(src["path"], src["origin"], src["change_key"], src["id"], strict=True):
        sh = shares[owner(unit_of(p), world)]
        sh.known.accepted[_digest(p)] = k
        sh.known.ids.add(i)
        sh.paths.append((p, o))
    rpath = root / layout.REJECTS
    if rpath.exists():
        t = _read(rpath, REJECTS_SCHEMA).to_pydict()
        cols = [t[c] for c in ("path", "origin", "change_key", "reason", "settings")]
        for p, o, k, r, s in zip(*cols, strict=True):
            sh = shares[owner(unit_of(p), world)]
            sh.known.rejected[_digest(p)] = (k, r, s)
            sh.paths.append((p, o))
    return shares


def _own_parts(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("*.parquet") if layout.visible(p.name)) if d.is_dir() else []


def _add_parts(known: _Known, d: Path) -> None:
    """Parts this rank committed in a run that was killed: done, so not examined again."""
    for p in _own_parts(d):
        if p.name.startswith("shards-"):
            known.shards.update(shardbook.read_rows(p))
        elif p.name.startswith("sources-"):
            t = _read(p, SOURCES_SCHEMA).to_pydict()
            for path, k, i in zip(t["path"], t["change_key"], t["id"], strict=True):
                known.accepted[_digest(path)] = k
                known.rejected.pop(_digest(path), None)
                known.ids.add(i)
        else:
            t = _read(p, REJECTS_SCHEMA).to_pydict()
            for path, k, r, s in zip(t["path"], t["change_key"], t["reason"], t["settings"], strict=True):
                known.rejected[_digest(path)] = (k, r, s)
                known.accepted.pop(_digest(path), None)


def _merge(total: IngestSummary, s: IngestSummary) -> None:
    for f in ("scanned", "new", "updated", "skipped", "duplicates", "retried", "retries", "fetched"):
        setattr(total, f, getattr(total, f) + getattr(s, f))
    total.rejects.update(s.rejects)
    total.interrupted |= s.interrupted


def ingest_ranked(
    sources: list, resolved: list, root: Path, cfg: IngestConfig, rank: int, world: int,
    patterns: list[str] | None = None,
) -> IngestSummary:  # fmt: skip
    """This rank's share of `ingest`; rank 0 returns the whole job's summary (see the module doc)."""
    from bigasp.workshare import meeting

    m = meeting()
    t0 = time.perf_counter()
    before = remote.stats()
    summary = IngestSummary()
    parts = root / layout.PARTS_DIR
    mine = parts if rank == 0 else parts / f"rank-{rank:05d}"
    lock = None
    shares: list[_Share] | None = None
    failure = ""
    try:
        _check_out(resolved, root)
        _make_out(root)
        mine.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            lock = manifest_lock(root, holder="another `bigasp ingest`, `annotate merge` or `quality score`")
            lock.__enter__()
            cfg = prepare(root, cfg)
            shares = _shares(root, world)
    except BigaspError as err:
        failure = f"rank {rank}: {err}"
    fails = m.all_gather(failure, "setup")  # one rank's bad setup stops every rank, none hangs
    if any(fails):
        if lock is not None:
            lock.__exit__(None, None, None)
        m.leave()  # rank 0 hosts the store under srun: it waits until every rank has read
        raise BigaspError(next(f for f in fails if f))
    cfg = m.broadcast(cfg, "config")  # the bucket rule rank 0 settled
    share = m.scatter(shares, "share")
    assert share is not None
    if rank != 0:
        _add_parts(share.known, mine)
    run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}-r{rank:05d}"
    seen = examine_all(sources, cfg, share.known, mine, run, summary, lambda u: owner(u, world) == rank)
    is_gone = gone_from(_scope(resolved, patterns), seen)
    gone = [p for p, o in share.paths if is_gone(p, o)] if cfg.prune else []
    _fetch_stats(summary, before)
    shipped = _own_parts(mine) if rank != 0 else []
    payload = ([(p.name, p.read_bytes()) for p in shipped], gone, summary)
    gathered = m.gather(payload, "parts")
    if rank == 0:
        assert gathered is not None and lock is not None
        try:
            removed: set[str] = set()
            total = IngestSummary()
            for files, lost, s in gathered:
                for name, data in files:
                    with layout.atomic_path(parts / name) as tmp:
                        Path(tmp).write_bytes(data)
                removed.update(lost)
                _merge(total, s)
            total.removed = _fold(root, prune=(lambda p, o: p in removed) if cfg.prune else None)
            total.total_images = _count(root)
        finally:
            lock.__exit__(None, None, None)
        summary = total
    m.barrier("folded")  # rank 0 has folded: the shipped parts are in the dataset
    for p in shipped:
        p.unlink()
    summary.seconds = time.perf_counter() - t0
    m.leave()
    return summary
