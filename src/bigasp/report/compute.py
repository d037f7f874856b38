"""The numbers behind `bigasp dataset report`, computed in streaming passes over the manifest.

The manifest is read in Arrow record batches (only the columns a pass needs) and every
statistic is a fixed-size histogram or a small dictionary that batches are added into, so
memory does not grow with the number of rows: at 13M rows the Python-object work is per
distinct tag or word per batch, never per row. Passes, each with its own progress bar:

1. columns: scores, buckets (the dataset's bucket rule applied to the image size, as encode
   does), resolutions, tags, captions per image, the sampler's token and chunk estimates,
   sources, caption types, watermark flags;
2. co-occurrence of the most used tags;
3. captions: words per caption, n-grams and CLIP token counts of a sample of captions
   (the slow pass). It runs in worker processes, one per available core, each over its own
   row ranges of a local manifest, and their counts are merged (`NgramCounter.merge` keeps
   the n-gram error bound); an object-storage manifest or spaCy tokens run in-process
   (see `report.captions`).

Annotation coverage, rejects and the latent count come from their own small files.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bigasp.errors import DataError
from bigasp.report.captions import MAX_WORDS
from bigasp.store import layout
from bigasp.text.aliases import AliasTable, normalize_tag

log = logging.getLogger(__name__)

SCORE_BINS = 11  # index 0 = unscored, 1..10 = score 0..9
MAX_TAGS_PER_IMAGE = 200
MAX_TOKENS = 400
RES_EDGES = 2.0 ** np.arange(6, 14.01, 0.25)  # 64 .. 16384 px, quarter-octave bins
CAPTION_TYPE_RE = r'"caption_type"\s*:\s*"(?P<t>[^"]*)"'
NONE = "(none)"


@dataclass
class ReportOptions:
    """What to compute; defaults suit a 13M-row dataset."""

    sample: int | None = None  # rows drawn uniformly (seeded) for a quick look; None = all
    seed: int = 0
    top_tags: int = 30  # tags in the co-occurrence matrix
    ngram_top: int = 10_000  # rows per n in ngrams.csv (bigASP kept the top 10k per n)
    max_n: int = 7
    ngrams: bool = True
    noun_chunks: bool = False  # spaCy noun chunks count as one token (needs spaCy + a model)
    spacy_model: str = "en_core_web_sm"
    token_sample: int = 100_000  # captions tokenised with the CLIP tokenizer
    batch_rows: int = 131_072
    ngram_capacity: int = 1_000_000  # candidates kept per n (see report.ngrams)
    progress: bool = True
    workers: int = 1  # caption-pass processes; 1 = in-process (measured fastest on 2 cores), 0 = one per core


@dataclass
class Report:
    """Everything the report shows; plain numbers and small arrays (see `to_json`)."""

    dataset: str
    rows_total: int
    rows: int = 0  # rows analysed (= rows_total unless sampled)
    sampled: bool = False
    score: np.ndarray = field(default_factory=lambda: np.zeros(SCORE_BINS, np.int64))
    bucket_names: list[str] = field(default_factory=list)
    bucket_rule: dict[str, Any] = field(default_factory=dict)
    bucket_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    score_by_bucket: np.ndarray = field(default_factory=lambda: np.zeros((0, SCORE_BINS), np.int64))
    no_size: int = 0
    resolution: np.ndarray = field(default_factory=lambda: np.zeros((len(RES_EDGES) - 1,) * 2, np.int64))
    megapixels: list[float] = field(default_factory=list)  # quantiles 0, 5, 25, 50, 75, 95, 100 %
    tags_raw: Counter = field(default_factory=Counter)
    tags_folded: Counter = field(default_factory=Counter)
    tag_canonical: dict[str, str] = field(default_factory=dict)
    alias_source: str | None = None
    tags_per_image: np.ndarray = field(default_factory=lambda: np.zeros(MAX_TAGS_PER_IMAGE + 1, np.int64))
    cooc_tags: list[str] = field(default_factory=list)
    cooc: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    captions_per_image: np.ndarray = field(default_factory=lambda: np.zeros(11, np.int64))
    captions: int = 0
    words_per_caption: np.ndarray = field(default_factory=lambda: np.zeros(MAX_WORDS + 1, np.int64))
    token_estimate: np.ndarray = field(default_factory=lambda: np.zeros(MAX_TOKENS + 1, np.int64))
    chunk_estimate: Counter = field(default_factory=Counter)
    quality_tokens: float = 0.0
    max_chunks: int = 3
    clip_tokens: np.ndarray = field(default_factory=lambda: np.zeros(MAX_TOKENS + 1, np.int64))
    clip_chunks: Counter = field(default_factory=Counter)
    clip_tokenized: int = 0
    sources: Counter = field(default_factory=Counter)
    caption_types: Counter = field(default_factory=Counter)
    watermark: dict[str, int] = field(default_factory=lambda: {"true": 0, "false": 0, "unknown": 0})
    annotations: list[dict[str, Any]] = field(default_factory=list)
    rejects: Counter = field(default_factory=Counter)
    latents: int = 0
    ngrams: dict[int, list[tuple[str, int, int]]] = field(default_factory=dict)
    ngram_mode: str = "words"
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per pass
    cpu_seconds: dict[str, float] = field(
        default_factory=dict
    )  # CPU time (all threads, workers too) per pass
    caption_workers: int = 1  # processes the caption pass ran in
    worker_peak_rss_gib: list[float] = field(default_factory=list)  # each caption worker's peak RSS

    def to_json(self) -> dict[str, Any]:
        def conv(v):
            if isinstance(v, np.ndarray):
                return v.tolist()
            if isinstance(v, Counter):
                return {str(k): int(c) for k, c in v.most_common()}
            if isinstance(v, dict):
                return {str(k): conv(x) for k, x in v.items()}
            if isinstance(v, list):
                return [conv(x) for x in v]
            if isinstance(v, tuple):
                return [conv(x) for x in v]
            return v

        return {
            k: conv(v)
            for k, v in self.__dict__.items()
            if k not in ("tags_raw", "tags_folded", "tag_canonical")
        } | {
            "distinct_tags": len(self.tags_raw),
            "distinct_tags_folded": len(self.tags_folded),
            "tag_uses": int(sum(self.tags_raw.values())),
        }


def _bar(desc: str, total: int, unit: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, smoothing=0.1)


class ManifestStream:
    """Record batches of the manifest (chosen columns), optionally a seeded uniform row sample."""

    def __init__(self, root: str, opts: ReportOptions):
        self.fs, self.root = layout.url_to_fs(root)
        self.path = f"{self.root}/{layout.MANIFEST}"
        if not self.fs.exists(self.path):
            raise DataError(f"{root} has no {layout.MANIFEST}; run `bigasp ingest` first")
        with self.fs.open(self.path, "rb") as f:
            pf = pq.ParquetFile(f)
            self.total = pf.metadata.num_rows
            self.columns = set(pf.schema_arrow.names)
        self.opts = opts
        self.selected: np.ndarray | None = None
        if opts.sample is not None and opts.sample < self.total:
            rng = np.random.default_rng(opts.seed)
            self.selected = np.sort(rng.choice(self.total, opts.sample, replace=False))
        self.rows = self.total if self.selected is None else len(self.selected)

    def batches(self, columns: list[str], desc: str) -> Iterator[pa.Table]:
        from bigasp.store.manifest import MANIFEST_SCHEMA, conform

        have = [c for c in columns if c in self.columns]
        schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
        with self.fs.open(self.path, "rb") as f, _bar(desc, self.rows, "row", self.opts.progress) as bar:
            offset = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=self.opts.batch_rows, columns=have):
                t = pa.Table.from_batches([batch])
                n = len(t)
                if self.selected is not None:
                    lo, hi = np.searchsorted(self.selected, [offset, offset + n])
                    t = t.take(pa.array(self.selected[lo:hi] - offset, pa.int64()))
                offset += n
                if len(t):
                    bar.update(len(t))
                    yield conform(t, schema)


def _np(col, fill) -> np.ndarray:
    return pc.fill_null(col, fill).to_numpy(zero_copy_only=False)


def _add_counts(counter: Counter, values: pa.Array) -> None:
    if len(values) == 0:
        return
    vc = pc.value_counts(values)
    for v, c in zip(vc.field(0).to_pylist(), vc.field(1).to_pylist(), strict=True):
        counter[NONE if v is None else v] += c


def _bincount_into(acc: np.ndarray, values: np.ndarray) -> None:
    acc += np.bincount(np.clip(values, 0, len(acc) - 1), minlength=len(acc))[: len(acc)]


def fold_tags(raw: Counter, aliases: AliasTable | None) -> tuple[Counter, dict[str, str]]:
    """(tag counts with Danbooru aliases folded into their canonical tag, raw tag -> canonical).

    Names are normalised as Danbooru stores them (lower case, underscores), so "Long Hair" and
    "long_hair" are one tag once folded; the raw counts keep them apart.
    """
    folded: Counter = Counter()
    canonical: dict[str, str] = {}
    for tag, c in raw.items():
        key = normalize_tag(tag)
        if aliases is not None:
            key = aliases.canonical_of.get(key, key)
        canonical[tag] = key
        folded[key] += c
    return folded, canonical


def collect(
    root: str,
    opts: ReportOptions,
    *,
    data_cfg=None,
    aliases: AliasTable | None = None,
) -> Report:
    """Run every pass over dataset `root`; `data_cfg` is the run's `[data]` (token/chunk estimates)."""
    from bigasp.buckets import BucketConfig, BucketSet
    from bigasp.store.manifest import read_dataset_json
    from bigasp.text.synthesis import expected_quality_tokens
    from bigasp.train.data import (
        CALIBRATION_SAMPLE,
        DataConfig,
        row_chunk_estimates,
        row_token_estimates,
        tokens_per_byte,
    )

    cfg = data_cfg or DataConfig()
    # spaCy is checked first: a missing model should fail now, not after the columnar passes
    chunker = noun_chunk_tokenizer(opts.spacy_model) if opts.ngrams and opts.noun_chunks else None
    stream = ManifestStream(root, opts)
    meta = read_dataset_json(stream.fs, stream.root)
    rule = BucketConfig(**meta.get("buckets", {}))
    bset = BucketSet(rule.buckets())
    rep = Report(dataset=str(root), rows_total=stream.total, rows=stream.rows)
    rep.sampled = stream.selected is not None
    rep.bucket_rule = rule.model_dump()
    rep.bucket_names = [b.name for b in bset.buckets]
    rep.bucket_counts = np.zeros(len(bset.buckets), np.int64)
    rep.score_by_bucket = np.zeros((len(bset.buckets), SCORE_BINS), np.int64)
    rep.max_chunks = cfg.max_chunks
    rep.quality_tokens = (
        cfg.quality_tokens if cfg.quality_tokens is not None else expected_quality_tokens(cfg.prompt)
    )
    rep.alias_source = aliases.source if aliases is not None else None
    mp_hist = np.zeros(4001, np.int64)  # megapixels in 0.01 MP steps, for quantiles

    # -- pass 1: columns -------------------------------------------------------------------
    t0, c0 = time.perf_counter(), time.process_time()
    cols = ["score", "width", "height", "tags", "captions", "source", "watermark", "extra"]
    # caption tokens per byte: measured per batch until one holds a full calibration sample, then
    # fixed, as the training stream does (tokenising 2048 captions per batch cost ~30 s at 13M rows)
    ratio: float | None = None
    for t in stream.batches(cols, "report: columns"):
        n = len(t)
        score = np.clip(_np(t["score"], -1).astype(np.int64), -1, 9) + 1
        rep.score += np.bincount(score, minlength=SCORE_BINS)
        w = _np(t["width"], 0).astype(np.int64)
        h = _np(t["height"], 0).astype(np.int64)
        ok = (w > 0) & (h > 0)
        rep.no_size += int(n - ok.sum())
        if ok.any():
            b = bset.nearest_indices(h[ok], w[ok])
            rep.bucket_counts += np.bincount(b, minlength=len(bset.buckets))
            sb = np.bincount(b * SCORE_BINS + score[ok], minlength=rep.score_by_bucket.size)
            rep.score_by_bucket += sb.reshape(rep.score_by_bucket.shape)
            rep.resolution += np.histogram2d(
                np.clip(w[ok], RES_EDGES[0], RES_EDGES[-1]),
                np.clip(h[ok], RES_EDGES[0], RES_EDGES[-1]),
                bins=[RES_EDGES, RES_EDGES],
            )[0].astype(np.int64)
            _bincount_into(mp_hist, np.rint(w[ok] * h[ok] / 1e4).astype(np.int64))
        tags = t["tags"].combine_chunks()
        _bincount_into(rep.tags_per_image, _np(pc.list_value_length(tags), 0).astype(np.int64))
        _add_counts(rep.tags_raw, pc.list_flatten(tags))
        caps = t["captions"].combine_chunks()
        n_caps = _np(pc.list_value_length(caps), 0).astype(np.int64)
        _bincount_into(rep.captions_per_image, n_caps)
        rep.captions += int(n_caps.sum())
        batch_ratio = ratio
        if batch_ratio is None:
            flat_caps = pc.list_flatten(caps)
            batch_ratio = tokens_per_byte(flat_caps)
            if len(flat_caps) >= CALIBRATION_SAMPLE:
                ratio = batch_ratio
        tokens = row_token_estimates(t, cfg.prompt, batch_ratio)
        _bincount_into(rep.token_estimate, tokens.astype(np.int64))
        chunks = row_chunk_estimates(t, cfg, tokens)
        rep.chunk_estimate.update(dict(zip(*np.unique(chunks, return_counts=True), strict=True)))
        _add_counts(rep.sources, t["source"].combine_chunks())
        ctype = pc.extract_regex(pc.fill_null(t["extra"].combine_chunks(), ""), CAPTION_TYPE_RE)
        _add_counts(rep.caption_types, pc.struct_field(ctype, [0]))
        wm = t["watermark"].combine_chunks()
        rep.watermark["true"] += int(pc.sum(pc.cast(pc.fill_null(wm, False), pa.int64())).as_py() or 0)
        rep.watermark["unknown"] += wm.null_count
        rep.watermark["false"] += (
            n - wm.null_count - int(pc.sum(pc.cast(pc.fill_null(wm, False), pa.int64())).as_py() or 0)
        )
    rep.chunk_estimate = Counter({int(k): int(v) for k, v in rep.chunk_estimate.items()})
    rep.megapixels = _quantiles(mp_hist, [0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0], scale=0.01)
    rep.tags_folded, rep.tag_canonical = fold_tags(rep.tags_raw, aliases)
    rep.seconds["columns"] = time.perf_counter() - t0
    rep.cpu_seconds["columns"] = time.process_time() - c0

    # -- pass 2: co-occurrence of the top tags ---------------------------------------------
    t0, c0 = time.perf_counter(), time.process_time()
    rep.cooc_tags = [t for t, _ in rep.tags_raw.most_common(opts.top_tags)]
    k = len(rep.cooc_tags)
    rep.cooc = np.zeros((k, k), np.int64)
    if k:
        value_set = pa.array(rep.cooc_tags, pa.string())
        for t in stream.batches(["tags"], "report: tag co-occurrence"):
            tags = t["tags"].combine_chunks()
            flat = pc.list_flatten(tags)
            parent = pc.list_parent_indices(tags).to_numpy(zero_copy_only=False)
            idx = _np(pc.index_in(flat, value_set=value_set), -1).astype(np.int64)
            keep = idx >= 0
            m = np.zeros((len(t), k), np.float32)
            m[parent[keep], idx[keep]] = 1.0
            rep.cooc += np.rint(m.T @ m).astype(np.int64)
    rep.seconds["cooccurrence"] = time.perf_counter() - t0
    rep.cpu_seconds["cooccurrence"] = time.process_time() - c0

    # -- small files -----------------------------------------------------------------------
    t0, c0 = time.perf_counter(), time.process_time()
    rep.annotations = annotation_coverage(stream)
    rep.rejects = reject_counts(stream)
    rep.latents = latent_count(stream)
    rep.seconds["files"] = time.perf_counter() - t0
    rep.cpu_seconds["files"] = time.process_time() - c0

    # -- pass 3: captions ------------------------------------------------------------------
    t0, c0 = time.perf_counter(), time.process_time()
    worker_cpu = caption_pass(stream, rep, opts, chunker)
    rep.seconds["captions"] = time.perf_counter() - t0
    rep.cpu_seconds["captions"] = time.process_time() - c0 + worker_cpu
    return rep


def _quantiles(hist: np.ndarray, qs: list[float], scale: float) -> list[float]:
    total = hist.sum()
    if total == 0:
        return []
    cum = np.cumsum(hist)
    return [float(np.searchsorted(cum, max(1, np.ceil(q * total))) * scale) for q in qs]


def caption_pass(
    stream: ManifestStream,
    rep: Report,
    opts: ReportOptions,
    chunker: Callable[[list[str]], tuple[pa.Array, np.ndarray]] | None = None,
) -> float:
    """Words per caption, n-grams (on `chunker`'s tokens when given) and a sample of CLIP token
    counts; returns the CPU seconds its worker processes spent (0 when it ran in-process).

    Worker processes (`report.captions`) split words and count n-grams; the CLIP tokenizer
    runs here, on the sampled captions they send back, so workers start without torch."""
    from bigasp.report.captions import CaptionCounts, caption_workers, parallel_captions

    if chunker is not None and opts.ngrams:
        rep.ngram_mode = f"spaCy noun chunks ({opts.spacy_model})"
    p = min(1.0, opts.token_sample / max(rep.captions, 1))
    workers = caption_workers(opts.workers, rep.captions)
    if workers > 1 and chunker is None and layout.is_local(stream.fs) and stream.rows > 0:
        parts = parallel_captions(stream, opts, p, workers)
        total = next(parts)
        _tokenize_sample(rep, total)
        for part in parts:
            _tokenize_sample(rep, part)
            total.merge(part)
        rep.worker_peak_rss_gib = [v / 1024**3 for v in total.peaks.values()]
        rep.caption_workers = len(total.peaks)
        worker_cpu = total.cpu_s
    else:
        total, worker_cpu = CaptionCounts.empty(opts.ngrams, opts.max_n, opts.ngram_capacity), 0.0
        rng = np.random.default_rng(opts.seed + 1)
        for t in stream.batches(["captions"], "report: captions"):
            flat = pc.list_flatten(t["captions"].combine_chunks())
            total.add(flat, np.flatnonzero(rng.random(len(flat)) < p), chunker)
            _tokenize_sample(rep, total)
        rep.caption_workers = 1
    rep.words_per_caption = total.words_per_caption
    if total.ngrams is not None:
        rep.ngrams = {n: total.ngrams.top(n, opts.ngram_top) for n in range(1, opts.max_n + 1)}
    return worker_cpu


def _tokenize_sample(rep: Report, counts) -> None:
    """CLIP token counts of the captions `counts` sampled (then dropped from it)."""
    from bigasp.text import n_chunks_for, tokenize

    if counts.sampled:
        lengths = np.array([len(x) for x in tokenize(counts.sampled)], np.int64)
        _bincount_into(rep.clip_tokens, lengths)
        rep.clip_chunks.update(n_chunks_for(int(x)) for x in lengths)
        rep.clip_tokenized += len(lengths)
        counts.sampled = []


def noun_chunk_tokenizer(model: str) -> Callable[[list[str]], tuple[pa.Array, np.ndarray]]:
    """bigASP's n-gram tokens: spaCy tokens, each noun chunk merged into one; punctuation dropped."""
    try:
        import spacy
    except ImportError:
        raise DataError(
            "--noun-chunks needs spaCy: `pip install spacy` and a local model (e.g. "
            f"`python -m spacy download {model}`), or drop --noun-chunks"
        ) from None
    try:
        nlp = spacy.load(model, disable=["ner", "lemmatizer"])
    except OSError as err:
        raise DataError(
            f"--noun-chunks: spaCy model {model!r} is not installed ({err}); install it or pass --spacy-model"
        ) from None

    def tokens(texts: list[str]) -> tuple[pa.Array, np.ndarray]:
        out: list[str] = []
        doc_ids: list[int] = []
        for i, doc in enumerate(nlp.pipe(texts, batch_size=256)):
            ends = {c.start: c.end for c in doc.noun_chunks}
            j = 0
            while j < len(doc):
                if j in ends:
                    text = " ".join(t.lower_ for t in doc[j : ends[j]] if not (t.is_punct or t.is_space))
                    j = ends[j]
                else:
                    tok = doc[j]
                    j += 1
                    if tok.is_punct or tok.is_space:
                        continue
                    text = tok.lower_
                if text:
                    out.append(text)
                    doc_ids.append(i)
        return pa.array(out, pa.string()), np.asarray(doc_ids, np.int64)

    return tokens


def annotation_coverage(stream: ManifestStream) -> list[dict[str, Any]]:
    """Per stage and model: how many manifest images have a result (ids counted once)."""
    from bigasp.store.annotations import ANNOTATIONS_DIR, list_models, list_parts

    if not layout.is_local(stream.fs):
        return []
    root = Path(stream.root)
    adir = root / ANNOTATIONS_DIR
    if not adir.is_dir():
        return []
    stages = sorted(p.name for p in adir.iterdir() if p.is_dir() and layout.visible(p.name))
    if not stages:
        return []
    with stream.fs.open(stream.path, "rb") as f:
        manifest_ids = pq.read_table(f, columns=["id"]).column("id").combine_chunks()
    out = []
    for stage in stages:
        for model in list_models(root, stage):
            parts = list_parts(root, stage, model)
            ids = (
                pc.unique(pa.concat_tables([pq.read_table(p, columns=["id"]) for p in parts]).column("id"))
                if parts
                else pa.array([], pa.string())
            )
            covered = int(pc.sum(pc.is_in(ids, value_set=manifest_ids)).as_py() or 0) if len(ids) else 0
            out.append(
                {
                    "stage": stage,
                    "model": model,
                    "parts": len(parts),
                    "images": covered,
                    "share": covered / max(len(manifest_ids), 1),
                    "unknown_ids": len(ids) - covered,
                }
            )
    return out


def reject_counts(stream: ManifestStream) -> Counter:
    from bigasp.store.manifest import read_rejects

    rejects = read_rejects(stream.fs, stream.root)
    out: Counter = Counter()
    if len(rejects):
        key = pc.binary_join_element_wise(
            pc.fill_null(rejects["stage"], "?"), pc.fill_null(rejects["reason"], "?"), ":"
        )
        _add_counts(out, key.combine_chunks())
    return out


def latent_count(stream: ManifestStream) -> int:
    """Stored latents (rows of the committed index files; Parquet footers only)."""
    paths = sorted(
        p for p in stream.fs.glob(f"{stream.root}/{layout.INDEX_DIR}/*.parquet") if layout.visible(p)
    )
    total = 0
    for p in paths:
        with stream.fs.open(p, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total
