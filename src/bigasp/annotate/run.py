"""The annotate passes: one decode per image for embed + tags + watermark, then captions.

Each rank takes every world_size-th image of the manifest sorted by id (captions: sorted by
a keyed hash, bigASP's shuffle that breaks the link between file order and the per-batch
prompt), so ranks never overlap and need no coordination. What is already done is what the
part files (and recorded failures) list, so a restart with any world size skips it. Results
are buffered per stage and written as a part every `part_size` images (temp + rename); a
kill loses at most the unwritten buffer, never a written part.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bigasp.annotate.config import STAGES, AnnotateConfig
from bigasp.annotate.decode import DecodeDataset, Job, collate, manifest_jobs
from bigasp.devices import resolve
from bigasp.errors import BigaspError, ConfigError, DataError
from bigasp.holdpoint import hold
from bigasp.store import annotations as store
from bigasp.store import layout, remote, workcopy
from bigasp.store.manifest import read_dataset_json, read_manifest
from bigasp.workshare import dist_env, gather_summary, summary_group

log = logging.getLogger(__name__)


def _key(seed: int, text: str, purpose: str) -> int:
    d = hashlib.blake2b(f"{seed}:{text}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") & ((1 << 63) - 1)


@dataclass
class StageSummary:
    planned: int = 0  # this rank's images for the stage
    skipped: int = 0  # already done (or failed) in an earlier run
    done: int = 0
    failed: Counter = field(default_factory=Counter)
    parts: int = 0
    model_seconds: float = 0.0  # time inside the model calls

    def merge(self, o: StageSummary) -> None:
        self.planned += o.planned
        self.skipped += o.skipped
        self.done += o.done
        self.failed.update(o.failed)
        self.parts += o.parts
        self.model_seconds = max(self.model_seconds, o.model_seconds)


@dataclass
class AnnotateSummary:
    rank: int = 0
    world_size: int = 1
    stages: dict[str, StageSummary] = field(default_factory=dict)
    images_decoded: int = 0
    pass_seconds: dict[str, float] = field(default_factory=dict)  # "image" / "caption" wall time
    stopped_early: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "images_decoded": self.images_decoded,
            "stopped_early": self.stopped_early,
            "seconds": round(self.seconds, 3),
            "pass_seconds": {k: round(v, 3) for k, v in self.pass_seconds.items()},
            "stages": {
                s: {
                    "planned": v.planned,
                    "skipped": v.skipped,
                    "done": v.done,
                    "failed": dict(sorted(v.failed.items())),
                    "parts": v.parts,
                    "model_seconds": round(v.model_seconds, 3),
                }
                for s, v in self.stages.items()
            },
        }

    def merge(self, o: AnnotateSummary) -> None:
        for s, v in o.stages.items():
            self.stages.setdefault(s, StageSummary()).merge(v)
        self.images_decoded += o.images_decoded
        for k, v in o.pass_seconds.items():
            self.pass_seconds[k] = max(self.pass_seconds.get(k, 0.0), v)
        self.stopped_early |= o.stopped_early
        self.seconds = max(self.seconds, o.seconds)


class StopAfterParts(Exception):
    """`limit_parts` reached: stop as a kill would, leaving unwritten results unwritten."""


class PartSink:
    """Buffers one stage's results and failures; writes a part every `part_size` results."""

    def __init__(
        self, root: Path, annot, summary: StageSummary, *, session: str, rank: int, cfg: AnnotateConfig
    ):
        self.root, self.annot, self.summary = root, annot, summary
        self.session, self.rank, self.cfg = session, rank, cfg
        self.ids: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.failures: list[dict[str, str]] = []
        self.seq = 0
        self.fseq = 0
        self.write_failed = False  # a part or failures file could not be written (a full disk)

    def add(self, image_id: str, row: dict[str, Any]) -> None:
        self.ids.append(image_id)
        self.rows.append(row)
        self.summary.done += 1

    def fail(self, image_id: str, reason: str, detail: str) -> None:
        self.failures.append({"id": image_id, "reason": reason, "detail": detail[:2000]})
        self.summary.failed[reason] += 1

    def flush(self, force: bool = False) -> None:
        while len(self.ids) >= self.cfg.part_size or (force and self.ids):
            n = self.cfg.part_size
            ids, rows = self.ids[:n], self.rows[:n]
            self.ids, self.rows = self.ids[n:], self.rows[n:]
            self.seq += 1
            try:
                store.write_part(
                    self.root, self.annot.stage, self.annot.key, self.annot.table(ids, rows),
                    session=self.session, rank=self.rank, seq=self.seq, provenance=self.annot.provenance,
                )  # fmt: skip
            except DataError:
                self.write_failed = True
                raise
            self.summary.parts += 1
            hold(f"annotate.part.{self.annot.stage}")
            if self.cfg.limit_parts and self.summary.parts >= self.cfg.limit_parts:
                raise StopAfterParts
        if self.failures and (force or len(self.failures) >= self.cfg.part_size):
            self.fseq += 1
            try:
                store.write_failures(self.root, self.annot.stage, self.annot.key, self.failures,
                                     session=self.session, rank=self.rank, seq=self.fseq)  # fmt: skip
            except DataError:
                self.write_failed = True
                raise
            self.failures = []


def _final_flush(sinks: list[PartSink], summary: AnnotateSummary) -> None:
    """Write what the sinks still hold, unless a write has failed: then nothing more is written
    (the disk is full), and the error naming the failed file and the parts kept before it is the
    one the command reports, not a second failure of a later part."""
    if any(sink.write_failed for sink in sinks):
        return
    for sink in sinks:
        try:
            sink.flush(force=True)
        except StopAfterParts:
            summary.stopped_early = True


def build_annotator(stage: str, cfg: AnnotateConfig, device):
    if stage == "embed":
        from bigasp.annotate.stats_embed import ImageStatsEmbedder, is_builtin_stats

        if is_builtin_stats(cfg.embed.model):
            return ImageStatsEmbedder(cfg.embed, device)
        from bigasp.annotate.embed import ClipEmbedder

        return ClipEmbedder(cfg.embed, device)
    if stage == "tags":
        from bigasp.annotate.tags import OnnxTagger

        return OnnxTagger(cfg.tags, device)
    if stage == "watermark":
        from bigasp.annotate.watermark import Owlv2Watermark

        return Owlv2Watermark(cfg.watermark, device)
    from bigasp.annotate.caption import JoyCaption

    return JoyCaption(cfg.caption, device)


def _run_rows(annot, arr: np.ndarray, sizes: list[tuple[int, int]], call) -> list[tuple[dict | None, str]]:
    """Rows for a batch; when the batch fails, each image alone, so one bad image costs only itself."""
    try:
        return [(r, "") for r in call(arr, sizes)]
    except BigaspError:
        raise
    except Exception as err:
        if len(arr) == 1:
            return [(None, f"{type(err).__name__}: {err}")]
    out: list[tuple[dict | None, str]] = []
    for k in range(len(arr)):
        out.extend(_run_rows(annot, arr[k : k + 1], sizes[k : k + 1], call))
    return out


def _loader(jobs: list[Job], annots: dict[str, Any], cfg: AnnotateConfig, device, *, batch_sampler=None):
    from torch.utils.data import DataLoader

    draft = 2 * max(a.input_side for a in annots.values()) if cfg.draft else 0
    ds = DecodeDataset(
        jobs, {s: a.prepare for s, a in annots.items()}, max_pixels=cfg.max_pixels, draft_to=draft
    )
    kw: dict[str, Any] = {"batch_sampler": batch_sampler} if batch_sampler else {"batch_size": cfg.batch_size}
    return DataLoader(
        ds,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        **kw,
    )


def _image_pass(root, jobs, stages, cfg, device, summary, session, rank) -> None:
    annots = {s: build_annotator(s, cfg, device) for s in stages}
    done = {s: store.done_ids(root, s, a.key, with_failures=not cfg.retry_failed) for s, a in annots.items()}
    todo = []
    for j in jobs:
        need = tuple(s for s in stages if j.id not in done[s])
        for s in stages:
            summary.stages[s].planned += 1
            summary.stages[s].skipped += s not in need
        if need:
            todo.append(replace(j, stages=need))
    if not todo:
        return
    sinks = {
        s: PartSink(root, a, summary.stages[s], session=session, rank=rank, cfg=cfg)
        for s, a in annots.items()
    }
    bar = _bar(cfg, len(todo), f"annotate r{rank}", rank)
    t0 = time.perf_counter()
    stopped = False
    try:
        for batch in _loader(todo, annots, cfg, device):
            summary.images_decoded += batch.count - sum(r == "unreadable" for _, r, _ in batch.failed)
            for i, reason, detail in batch.failed:
                for s in todo[i].stages:
                    sinks[s].fail(todo[i].id, reason, detail)
            for s, (idx, arr) in batch.inputs.items():
                sizes = [batch.sizes[i] for i in idx]
                t = time.perf_counter()
                results = _run_rows(annots[s], arr, sizes, annots[s].run)
                summary.stages[s].model_seconds += time.perf_counter() - t
                for i, (row, err) in zip(idx, results, strict=True):
                    if row is None:
                        sinks[s].fail(todo[i].id, "model_error", err)
                    else:
                        sinks[s].add(todo[i].id, row)
            for sink in sinks.values():
                sink.flush()
            bar.update(batch.count)
    except StopAfterParts:
        stopped = summary.stopped_early = True
    finally:
        bar.close()
        if not stopped:
            _final_flush(list(sinks.values()), summary)
    summary.pass_seconds["image"] = time.perf_counter() - t0


def _scores(root: Path, manifest: pa.Table) -> dict[str, int | None]:
    """Quality scores: the quality stage's results when present, else the manifest's column."""
    scores = dict(zip(manifest.column("id").to_pylist(), manifest.column("score").to_pylist(), strict=True))
    if store.list_models(root, "quality"):
        q = store.read_stage(root, "quality")
        if "score" in q.column_names:
            scores.update(zip(q.column("id").to_pylist(), q.column("score").to_pylist(), strict=True))
    return scores


def caption_order(ids: list[str], seed: int) -> list[str]:
    """bigASP shuffled the todo list once; a keyed hash gives the same effect with no broadcast."""
    return sorted(ids, key=lambda i: (_key(seed, i, "caption-order"), i))


def _caption_pass(root, manifest, jobs_by_id, cfg, device, summary, session, rank, world) -> None:
    annot = build_annotator("caption", cfg, device)
    st = summary.stages["caption"]
    scores = _scores(root, manifest) if cfg.caption.skip_score_zero else {}
    eligible = [i for i in sorted(jobs_by_id) if scores.get(i) != 0]
    mine = caption_order(eligible, cfg.seed)[rank::world]
    done = store.done_ids(root, "caption", annot.key, with_failures=not cfg.retry_failed)
    todo = [replace(jobs_by_id[i], stages=("caption",)) for i in mine if i not in done]
    st.planned, st.skipped = len(mine), len(mine) - len(todo)
    if not todo:
        return
    bs = cfg.caption.batch_size
    batches = [list(range(k, min(k + bs, len(todo)))) for k in range(0, len(todo), bs)]
    prompts = [
        annot.prompts.draw(np.random.default_rng(_key(cfg.seed, todo[b[0]].id, "prompt"))) for b in batches
    ]
    sink = PartSink(root, annot, st, session=session, rank=rank, cfg=cfg)
    bar = _bar(cfg, len(todo), f"caption r{rank}", rank)
    t0 = time.perf_counter()
    stopped = False
    try:
        loader = _loader(todo, {"caption": annot}, cfg, device, batch_sampler=batches)
        for b, batch in enumerate(loader):
            summary.images_decoded += batch.count
            for i, reason, detail in batch.failed:
                sink.fail(todo[i].id, reason, detail)
            if "caption" in batch.inputs:
                idx, arr = batch.inputs["caption"]
                ctype, prompt = prompts[b]
                seed = _key(cfg.seed, todo[batches[b][0]].id, "sample")

                def call(a, _sizes, prompt=prompt, seed=seed, ctype=ctype):
                    return [
                        {"caption": c, "caption_type": ctype, "prompt": prompt}
                        for c in annot.generate(a, prompt, seed)
                    ]

                t = time.perf_counter()
                results = _run_rows(annot, arr, [batch.sizes[i] for i in idx], call)
                st.model_seconds += time.perf_counter() - t
                for i, (row, err) in zip(idx, results, strict=True):
                    if row is None:
                        sink.fail(todo[i].id, "model_error", err)
                    else:
                        sink.add(todo[i].id, row)
            sink.flush()
            bar.update(batch.count)
    except StopAfterParts:
        stopped = summary.stopped_early = True
    finally:
        bar.close()
        if not stopped:
            _final_flush([sink], summary)
    summary.pass_seconds["caption"] = time.perf_counter() - t0


def _bar(cfg: AnnotateConfig, total: int, desc: str, rank: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not cfg.progress or rank != 0)


def enabled_stages(cfg: AnnotateConfig) -> list[str]:
    stages = list(dict.fromkeys(cfg.stages)) or [s for s in STAGES if getattr(cfg, s).model]
    if not stages:
        raise ConfigError(
            "annotate has nothing to do: set a model for at least one stage (--embed-model, --tags-model, "
            "--watermark-model, --caption-model or the [annotate.<stage>] model keys)"
        )
    return stages


def annotate(dataset: str | os.PathLike, cfg: AnnotateConfig) -> AnnotateSummary:
    """Annotate this rank's share of `dataset`; returns the summary (merged over ranks on rank 0)."""
    t0 = time.perf_counter()
    remote.configure(cfg.storage_options)  # photos ingested from URLs are re-read from there
    url = str(dataset).rstrip("/") if remote.is_url(str(dataset)) else None
    if url:  # run in this machine's working copy; the parts go to the URL for `merge` anywhere
        root = workcopy.work_dir(url, cfg.work_dir)
        stages = enabled_stages(cfg)  # their parts at the URL are what is done; captions read the scores
        needed = [*stages, *(["quality"] if "caption" in stages else [])]
        workcopy.pull(url, root, cfg.storage_options, annotations=needed)
        try:
            return _annotate(root, cfg, t0)
        finally:  # also after a failure or Ctrl-C: the parts written so far are kept at the URL
            workcopy.push(url, root, cfg.storage_options, tables=(), annotations=True)
    return _annotate(Path(dataset), cfg, t0)


def _annotate(root: Path, cfg: AnnotateConfig, t0: float) -> AnnotateSummary:
    fs, rootp = layout.url_to_fs(str(root))
    read_dataset_json(fs, rootp)
    stages = enabled_stages(cfg)
    manifest = read_manifest(fs, rootp)
    if len(manifest) == 0:
        raise DataError(f"{root}/{layout.MANIFEST} is missing or has no images; run `bigasp ingest` first")
    rank, world, local_rank = dist_env()
    from bigasp import progress

    progress.quiet_libraries()  # transformers' own loading bars would interleave with bigasp's
    pg = summary_group(world, "annotate")
    device = resolve(cfg.device, local_rank=local_rank, setting="annotate.device")
    summary = AnnotateSummary(rank=rank, world_size=world, stages={s: StageSummary() for s in stages})
    session = uuid.uuid4().hex[:8]
    jobs = manifest_jobs(manifest)
    image_stages = [s for s in stages if s != "caption"]
    if image_stages:
        _image_pass(root, jobs[rank::world], image_stages, cfg, device, summary, session, rank)
    if "caption" in stages and not summary.stopped_early:
        _caption_pass(root, manifest, {j.id: j for j in jobs}, cfg, device, summary, session, rank, world)
    summary.seconds = time.perf_counter() - t0
    if pg:
        summary = gather_summary(summary)
    return summary
