"""The caption pass of `bigasp dataset report`, split over worker processes.

Splitting captions into words and counting their n-grams is CPU-bound numpy work on one core
per process, so on a machine with several cores the manifest's rows are cut into ranges and
each worker counts its ranges; the parent merges the counts (`NgramCounter.merge` keeps the
n-gram error bound) in range order, so a given worker count always gives the same report.

Workers import only numpy, pyarrow and the n-gram counter (no torch, no tokenizer), so they
start in about a second; the captions drawn for the CLIP token sample travel back as text and
the parent tokenises them while the workers run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bigasp.memstat import rss_peak_bytes
from bigasp.report.ngrams import NgramCounter, caption_ids

if TYPE_CHECKING:
    from bigasp.report.compute import ManifestStream, ReportOptions

MAX_WORDS = 400  # words-per-caption histogram: the last bin holds every longer caption
PARALLEL_MIN_CAPTIONS = 1_000_000  # below this, the workers' fixed costs (start, merging) outweigh the gain


@dataclass
class CaptionCounts:
    """What the caption pass adds up over its share of the captions."""

    words_per_caption: np.ndarray
    ngrams: NgramCounter | None
    sampled: list[str] = field(default_factory=list)  # captions drawn for CLIP tokenisation
    cpu_s: float = 0.0  # CPU seconds of the workers merged in
    peaks: dict[int, int] = field(default_factory=dict)  # worker pid -> RSS high-water mark (bytes)

    @classmethod
    def empty(cls, ngrams: bool, max_n: int, capacity: int) -> CaptionCounts:
        counter = NgramCounter(max_n=max_n, capacity=capacity) if ngrams else None
        return cls(words_per_caption=np.zeros(MAX_WORDS + 1, np.int64), ngrams=counter)

    def add(
        self,
        flat: pa.Array,
        pick: np.ndarray,
        chunker: Callable[[list[str]], tuple[pa.Array, np.ndarray]] | None = None,
    ) -> None:
        """Count a flat array of captions; keep the text of those at positions `pick`."""
        ids, dictionary, doc, per_caption = caption_ids(flat)
        hist = np.bincount(np.clip(per_caption, 0, MAX_WORDS), minlength=MAX_WORDS + 1)
        self.words_per_caption += hist[: MAX_WORDS + 1]
        if self.ngrams is not None:
            if chunker is None:
                self.ngrams.add_ids(ids, dictionary, doc, len(flat))
            else:
                cw, cd = chunker(pc.fill_null(flat, "").to_pylist())
                self.ngrams.add_words(cw, cd, len(flat))
        if len(pick):
            self.sampled += pc.fill_null(flat.take(pa.array(pick)), "").to_pylist()

    def merge(self, other: CaptionCounts) -> None:
        self.words_per_caption += other.words_per_caption
        self.sampled += other.sampled
        self.cpu_s += other.cpu_s
        for pid, peak in other.peaks.items():
            self.peaks[pid] = max(self.peaks.get(pid, 0), peak)
        if self.ngrams is not None and other.ngrams is not None:
            self.ngrams.merge(other.ngrams)


def caption_workers(workers: int, captions: int) -> int:
    """Processes for the caption pass: `workers` when > 0; for 0, the cores this process may
    use, once there are at least PARALLEL_MIN_CAPTIONS captions."""
    if workers > 0:
        return workers
    if captions < PARALLEL_MIN_CAPTIONS:
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class CaptionTask:
    """One share: manifest rows [lo, hi) (only the sampled ones when `selected` is set)."""

    path: str
    row_groups: list[int]  # the file's row groups that overlap [lo, hi), contiguous
    first_row: int  # manifest row of the first of them
    lo: int
    hi: int
    selected: np.ndarray | None  # sampled manifest rows in [lo, hi), ascending
    batch_rows: int
    ngrams: bool
    max_n: int
    capacity: int
    p: float  # probability that a caption is drawn for CLIP tokenisation
    seed: int


def caption_tasks(stream: ManifestStream, opts: ReportOptions, p: float, workers: int) -> list[CaptionTask]:
    """Cut the manifest into equal row ranges, two per worker when the file has at least as
    many row groups (so a slow worker ends up with less), else one. A cut moves to a row-group
    boundary within a tenth of a share of it; otherwise the two neighbours both read that
    group (decoding it is cheap next to counting its n-grams)."""
    with stream.fs.open(stream.path, "rb") as f:
        md = pq.ParquetFile(f).metadata
    sizes = np.array([md.row_group(i).num_rows for i in range(md.num_row_groups)], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    n_tasks = 2 * workers if len(sizes) >= 2 * workers else workers
    share = stream.total / n_tasks
    cuts = np.linspace(0, stream.total, n_tasks + 1)[1:-1]
    near = starts[np.clip(np.searchsorted(starts, cuts), 0, len(starts) - 1)]
    below = starts[np.clip(np.searchsorted(starts, cuts) - 1, 0, len(starts) - 1)]
    near = np.where(np.abs(below - cuts) < np.abs(near - cuts), below, near)
    cuts = np.where(np.abs(near - cuts) <= share / 10, near, np.rint(cuts)).astype(np.int64)
    bounds = np.unique(np.concatenate([[0], cuts, [stream.total]]))
    tasks = []
    for k, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
        groups = [g for g in range(len(sizes)) if starts[g] < hi and starts[g + 1] > lo]
        sel = None
        if stream.selected is not None:
            a, b = np.searchsorted(stream.selected, [lo, hi])
            sel = stream.selected[a:b]
        tasks.append(
            CaptionTask(
                path=stream.path,
                row_groups=groups,
                first_row=int(starts[groups[0]]) if groups else lo,
                lo=lo,
                hi=hi,
                selected=sel,
                batch_rows=opts.batch_rows,
                ngrams=opts.ngrams,
                max_n=opts.max_n,
                capacity=opts.ngram_capacity,
                p=p,
                seed=opts.seed + 1 + k,
            )
        )
    return tasks


def run_task(task: CaptionTask) -> CaptionCounts:
    """Worker side: read the task's row groups (captions only), keep its rows, count them."""
    from bigasp.store.manifest import MANIFEST_SCHEMA, conform

    c0 = time.process_time()
    out = CaptionCounts.empty(task.ngrams, task.max_n, task.capacity)
    rng = np.random.default_rng(task.seed)
    schema = pa.schema([MANIFEST_SCHEMA.field("captions")])
    offset = task.first_row
    batches = pq.ParquetFile(task.path).iter_batches(
        batch_size=task.batch_rows, columns=["captions"], row_groups=task.row_groups
    )
    for batch in batches:
        n = batch.num_rows
        lo, hi = max(task.lo - offset, 0), min(task.hi - offset, n)
        t = pa.Table.from_batches([batch])
        if task.selected is not None:
            a, b = np.searchsorted(task.selected, [offset + lo, offset + hi])
            t = t.take(pa.array(task.selected[a:b] - offset, pa.int64()))
        elif hi > lo:
            t = t.slice(lo, hi - lo)
        offset += n
        if hi <= lo or len(t) == 0:
            continue
        flat = pc.list_flatten(conform(t, schema)["captions"].combine_chunks())
        out.add(flat, np.flatnonzero(rng.random(len(flat)) < task.p))
        if offset >= task.hi:
            break  # the rest of the last row group belongs to the next range
    out.cpu_s = time.process_time() - c0
    out.peaks = {os.getpid(): rss_peak_bytes()}
    return out


def parallel_captions(
    stream: ManifestStream, opts: ReportOptions, p: float, workers: int
) -> Iterator[CaptionCounts]:
    """Each task's counts, in task order, from `workers` spawned processes."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from bigasp.report.compute import _bar

    tasks = caption_tasks(stream, opts, p, workers)
    ctx = mp.get_context("spawn")  # the parent may hold tokenizer threads: never fork it
    with (
        ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx) as pool,
        _bar("report: captions", stream.rows, "row", opts.progress) as bar,
    ):
        futures = [pool.submit(run_task, t) for t in tasks]
        for task, fut in zip(tasks, futures, strict=True):
            part = fut.result()
            bar.update(len(task.selected) if task.selected is not None else task.hi - task.lo)
            yield part
