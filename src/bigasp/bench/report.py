"""`bigasp bench report`: `bigasp dataset report` on a synthetic N-row manifest.

The manifest is generated in Arrow (untimed): sizes from the bigASP v2 card's bucket
histogram scaled by 1-3x, scores 0-9, 1-2 captions per image whose lengths follow
JoyCaption's requested word counts (Normal(45, 30) rounded up to a multiple of 10, clamped to
20..170, as bigASP's captioning script drew them) over a Zipf-distributed 20k-word vocabulary
with punctuation, Normal(32, 19.8) tags per image (the v1 card's figures) from a Zipf-distributed
5k-tag vocabulary, sources, watermark flags, caption types in `extra`, rejects, and tag
annotations for half the images.

Timed: the columnar passes (target: 13M rows in < 5 min and < 8 GB on the 2-core box) and the
caption pass (n-grams; target >= 20k captions/s per core), plus plots and HTML. With `--workers`
the caption pass runs in worker processes (`caption_workers`): its CPU seconds include theirs, and
`caption_worker_peak_rss_gib` lists each worker's peak RSS (`peak_rss_gib` is this process's).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from bigasp.bench.common import BenchResult, PeakMemory, machine_info
from bigasp.bench.plan import CARD_BUCKETS

TARGET_COLUMNS_S_13M = 300.0
TARGET_CAPTIONS_PER_S = 20_000.0
CAPTION_TYPES = ["Descriptive", "Descriptive (Informal)", "Training Prompt", "MidJourney"]
CAPTION_TYPE_P = [0.6, 0.1, 0.2, 0.1]
SOURCES = ["reddit", "flickr", "fansly", "onlyfans", "unsplash", None]
SOURCE_P = [0.5, 0.2, 0.1, 0.1, 0.05, 0.05]
SCORE_P = [0.02, 0.08, 0.12, 0.15, 0.16, 0.15, 0.12, 0.1, 0.06, 0.04]


def _zipf_ids(rng, n: int, size: int, a: float = 1.15) -> np.ndarray:
    return (rng.zipf(a, n) - 1) % size


def _vocab(prefix: str, size: int, rng) -> pa.Array:
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "ba", "do", "fi", "gu", "ha", "je", "pe"]
    words = []
    for i in range(size):
        k, parts = i, []
        while True:
            parts.append(syll[k % 16])
            k //= 16
            if k == 0:
                break
        words.append(prefix + "".join(parts))
    return pa.array(words, pa.string())


def _lists(values: pa.Array, lengths: np.ndarray) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _hex_ids(rng, n: int) -> pa.Array:
    lut = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")
    raw = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    return pa.array(np.ascontiguousarray(lut[raw]).view("S32").ravel()).cast(pa.string())


def write_synthetic_dataset(root: Path, rows: int, seed: int = 0, chunk: int = 250_000) -> dict:
    """A dataset directory with an N-row manifest, rejects and tag annotations; returns counts."""
    from bigasp.store import layout
    from bigasp.store.annotations import write_part
    from bigasp.store.manifest import MANIFEST_SCHEMA, REJECTS_SCHEMA, conform, init_dataset

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    init_dataset(root)
    words = _vocab("", 20_000, rng)
    # ~12% of word forms carry punctuation, as captions do ("hair," "background.")
    punct = np.where(rng.random(len(words)) < 0.12, rng.choice([",", ".", "!", ";"], len(words)), "")
    words = pc.binary_join_element_wise(words, pa.array(punct), "")
    tags = _vocab("t_", 5_000, rng)
    sizes = np.array(list(CARD_BUCKETS), dtype=np.int64)
    p = np.array(list(CARD_BUCKETS.values()), dtype=np.float64)
    types = pa.array([json.dumps({"caption_type": t}) for t in CAPTION_TYPES])
    sources = pa.array(SOURCES, pa.string())
    n_captions = 0
    annotated: list[pa.Array] = []
    with pq.ParquetWriter(root / layout.MANIFEST, MANIFEST_SCHEMA, compression="zstd") as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            ids = _hex_ids(rng, n)
            pick = rng.choice(len(sizes), n, p=p / p.sum())
            scale = rng.uniform(1.0, 3.0, n)
            width = (sizes[pick, 1] * scale).astype(np.int32)
            height = (sizes[pick, 0] * scale).astype(np.int32)
            n_tags = np.clip(np.rint(rng.normal(32, 19.8, n)), 0, 120).astype(np.int64)
            tag_lists = _lists(tags.take(pa.array(_zipf_ids(rng, int(n_tags.sum()), len(tags)))), n_tags)
            caps_per = np.where(rng.random(n) < 0.2, 2, 1)
            m = int(caps_per.sum())
            target = np.clip(np.ceil(np.maximum(rng.normal(45, 30, m), 1) / 10) * 10, 20, 170)
            n_words = np.maximum(1, np.rint(target * rng.uniform(0.7, 1.1, m))).astype(np.int64)
            flat_words = words.take(pa.array(_zipf_ids(rng, int(n_words.sum()), len(words))))
            captions = pc.binary_join(_lists(flat_words, n_words), " ")
            n_captions += m
            table = pa.table(
                {
                    "id": ids,
                    "width": pa.array(width),
                    "height": pa.array(height),
                    "captions": _lists(captions, caps_per),
                    "tags": tag_lists,
                    "score": pa.array(rng.choice(10, n, p=SCORE_P).astype(np.int8)),
                    "source": sources.take(pa.array(rng.choice(len(SOURCES), n, p=SOURCE_P))),
                    "watermark": pa.array(rng.random(n) < 0.1),
                    "extra": types.take(pa.array(rng.choice(len(CAPTION_TYPES), n, p=CAPTION_TYPE_P))),
                }
            )
            writer.write_table(conform(table, MANIFEST_SCHEMA))
            annotated.append(ids.filter(pa.array(rng.random(n) < 0.5)))
    rejects = pa.table(
        {
            "path": pa.array([f"bad/{i}.jpg" for i in range(300)]),
            "reason": pa.array(rng.choice(["too_small", "duplicate", "truncated", "bad_sidecar"], 300)),
            "stage": pa.array(["ingest"] * 300),
        }
    )
    layout.atomic_write_parquet(conform(rejects, REJECTS_SCHEMA), root / layout.REJECTS)
    for seq, ids in enumerate(annotated):
        write_part(
            root, "tags", "joytag", pa.table({"id": ids}), session="bench", rank=0, seq=seq, provenance={}
        )
    return {"rows": rows, "captions": n_captions}


def _load_average() -> float | None:
    """The 1-minute load average at the end (how busy the machine was: wall times depend on it)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_report_bench(
    *, rows: int, seed: int, ngrams: bool, command: str, keep: str | None = None, workers: int = 1
) -> BenchResult:
    from bigasp.report import ReportOptions, collect, write_report

    with tempfile.TemporaryDirectory(prefix="bigasp-bench-report-") as tmp:
        root = Path(keep) if keep else Path(tmp) / "ds"
        t0 = time.perf_counter()
        if not (root / "manifest.parquet").exists():  # --keep DIR reuses a generated dataset
            write_synthetic_dataset(root, rows, seed)
        gen_s = time.perf_counter() - t0
        opts = ReportOptions(ngrams=ngrams, progress=False, workers=workers)
        with PeakMemory(torch.device("cpu")) as mem:
            t0 = time.perf_counter()
            rep = collect(str(root), opts)
            write_report(rep, Path(tmp) / "report")
            total_s = time.perf_counter() - t0
    s, cpu = rep.seconds, rep.cpu_seconds
    columnar_s = s["columns"] + s["cooccurrence"] + s["files"]
    columnar_cpu_s = cpu["columns"] + cpu["cooccurrence"] + cpu["files"]
    captions = int(rep.words_per_caption.sum())
    metrics = {
        "rows": rep.rows,
        "captions": captions,
        "columnar_s": columnar_s,
        "columns_pass_s": s["columns"],
        "cooccurrence_pass_s": s["cooccurrence"],
        "files_s": s["files"],
        "captions_pass_s": s["captions"],
        "columnar_cpu_s": columnar_cpu_s,
        "captions_per_s": captions / s["captions"] if s["captions"] else 0.0,
        "captions_cpu_s": cpu["captions"],
        "captions_per_cpu_s": captions / cpu["captions"] if cpu["captions"] else 0.0,
        "clip_tokenized": rep.clip_tokenized,
        "ngram_max_undercount": max((u for rows in rep.ngrams.values() for _, _, u in rows), default=0),
        "ngram_7_top_count": rep.ngrams[7][0][1] if rep.ngrams.get(7) else 0,
        "write_s": s.get("write", 0.0),
        "total_s": total_s,
        "columnar_s_scaled_to_13m": columnar_s * 13_000_000 / max(rep.rows, 1),
        "generate_s": gen_s,
        "caption_workers": rep.caption_workers,
        "caption_worker_peak_rss_gib": rep.worker_peak_rss_gib,
        "load_average_1m": _load_average(),
        **mem.result(),
    }
    return BenchResult(
        bench="report",
        config={"rows": rows, "seed": seed, "ngrams": ngrams, "clip_token_sample": opts.token_sample},
        metrics=metrics,
        headline=[
            ("columnar_s", "s columnar"),
            ("captions_per_cpu_s", "captions per CPU-s (caption pass)"),
            ("peak_rss_gib", "GiB peak RSS"),
        ],
        command=command,
        machine=machine_info(torch.device("cpu")),
    )
