#!/usr/bin/env python
"""Measure the training data path (numbers go to docs/PERFORMANCE.md, "Training data path").

    python scripts/bench_train_data.py estimate --rows 1000000     # caption token estimates
    python scripts/bench_train_data.py init --rows 13000000        # whole TrainLoader construction + epoch
    python scripts/bench_train_data.py throughput --latent 8       # read+decompress+synth+tokenize+collate

These are the profiling measurements `bigasp bench` does not make: `init` adds everything
`TrainLoader` does before the first batch to `bigasp bench plan`'s bucketing + epoch order, and
`throughput` splits `bigasp bench load`'s per-sample cost into read, synthesis and tokenization.
Synthetic rows come from `bigasp.bench.plan.synthetic_columns` (the card's bucket histogram).
Peak RSS is the whole process (Python + numpy + arrays).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bigasp.bench.plan import synthetic_columns


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_estimate(rows: int, max_words: int) -> dict:
    import pyarrow as pa

    from bigasp.text import tokenize
    from bigasp.text.synthesis import PromptConfig
    from bigasp.train.data import row_token_estimates

    words = "a photo of woman man with long blonde hair sitting on the bed in front of window, sunlight. " * 3
    vocab = words.split()
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, max_words, 2000)
    pool = [" ".join(rng.choice(vocab, k)) for k in lengths]
    flat = pa.array(pool).take(pa.array(np.arange(rows) % len(pool)))
    caps = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32)), flat)
    table = pa.table({"captions": caps})
    tokenize(["warm up the tokenizer"])  # loading transformers is not part of the estimate
    t0 = time.perf_counter()
    est = row_token_estimates(table, PromptConfig())
    dt = time.perf_counter() - t0
    true = np.array([len(t) for t in tokenize(pool)])
    return {
        "rows": rows,
        "seconds": round(dt, 2),
        "rows_per_s": round(rows / dt),
        "estimate_over_true_mean": round(float(est[: len(pool)].sum() / true.sum()), 3),
        "rows_within_10pct": round(float((np.abs(est[: len(pool)] - true) <= 0.1 * true + 1).mean()), 3),
        "peak_rss_mb": round(peak_rss_mb()),
    }


class _TableOnly:
    """Stands in for LatentDataset where only `.table` is used (loader construction reads no latent)."""

    def __init__(self, table):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)


def bench_loader_init(rows: int, max_words: int, world: int, batch: int) -> dict:
    """TrainLoader construction (split, token + chunk estimates, buckets) + epoch plan + this rank's items."""
    import pyarrow as pa

    from bigasp.text import tokenize
    from bigasp.train.data import DataConfig, TrainLoader

    heights, widths, _ = synthetic_columns(rows)
    vocab = [
        "a",
        "photo",
        "of",
        "woman",
        "man",
        "with",
        "long",
        "blonde",
        "hair",
        "sitting",
        "on",
        "the",
        "bed",
        "in",
        "front",
        "of",
        "window,",
        "sunlight.",
    ]
    rng = np.random.default_rng(0)
    pool = [" ".join(rng.choice(vocab, k)) for k in rng.integers(4, max_words, 2000)]
    flat = pa.array(pool).take(pa.array(rng.integers(0, len(pool), rows)))
    table = pa.table(
        {
            "id": pa.array(
                [f"{i:032x}" for i in rng.integers(0, 1 << 62, rows).tolist()]
            ),  # the split keys on it
            "captions": pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32)), flat),
            "score": pa.array(rng.integers(0, 10, rows).astype(np.int8)),
            "bucket_height": pa.array(heights),
            "bucket_width": pa.array(widths),
        }
    )
    tokenize(["warm up the tokenizer"])
    base = peak_rss_mb()
    t0 = time.perf_counter()
    loader = TrainLoader(_TableOnly(table), DataConfig(), rank=0, world_size=world, device_batch_size=batch)
    t1 = time.perf_counter()
    plan = loader.plan(0)
    items = loader._items(plan, 0)
    t2 = time.perf_counter()
    return {
        "rows": rows,
        "train_rows": len(loader.split.train),
        "world_size": world,
        "device_batch_size": batch,
        "buckets": loader.buckets.n_buckets,
        "loader_init_s": round(t1 - t0, 2),
        "epoch_plan_and_rank_items_s": round(t2 - t1, 2),
        "total_s": round(t2 - t0, 2),
        "rank0_batches": len(items),
        "table_mb": round(table.nbytes / 2**20),
        "peak_rss_mb": round(peak_rss_mb()),
        "peak_rss_above_table_mb": round(peak_rss_mb() - base),
    }


def bench_throughput(latent: int, n_images: int, batch: int, batches: int, workers: int) -> dict:
    import pyarrow as pa
    import torch

    from bigasp.store import LatentDataset, RecordMeta, ShardWriter, layout
    from bigasp.store.manifest import MANIFEST_SCHEMA, init_dataset
    from bigasp.train.data import DataConfig, TrainLoader

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    init_dataset(root)
    rng = np.random.default_rng(0)
    vocab = [
        "a",
        "photo",
        "of",
        "woman",
        "man",
        "with",
        "long",
        "blonde",
        "hair",
        "sitting",
        "on",
        "the",
        "bed",
        "in",
        "front",
        "of",
        "window",
        "sunlight",
    ]
    px = latent * 8
    rows = []
    w = ShardWriter(root, "bench", px, px, compression="zstd")
    for i in range(n_images):
        iid = f"{i:08d}"
        w.add(rng.standard_normal((4, latent, latent)).astype(np.float16), RecordMeta(iid, 1500, 1000, 0, 0))
        cap = " ".join(rng.choice(vocab, int(rng.integers(8, 170)))) + "."
        rows.append(
            {
                "id": iid,
                "captions": [cap],
                "tags": [f"tag_{k}" for k in range(30)],
                "score": int(rng.integers(1, 10)),
                "watermark": bool(i % 7 == 0),
                "extra": "{}",
            }
        )
    w.close()
    layout.atomic_write_parquet(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), root / layout.MANIFEST)
    ds = LatentDataset(str(root))
    cfg = DataConfig(num_workers=workers, device_batch_size=batch, validation_size=0, stable_size=0)
    loader = TrainLoader(ds, cfg, rank=0, world_size=1)
    it = iter(loader)
    next(it)  # tokenizer load, worker start
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for _ in range(batches):
        n += len(next(it))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    # Stage breakdown on the same rows, single process (which stage bounds a worker).
    from bigasp.text import tokenize
    from bigasp.train.data import synthesize_rows

    sample = np.arange(min(n_images, 256))
    t = time.process_time()
    for i in sample:
        ds.read_latent(int(i))
    t_read = time.process_time() - t
    t = time.process_time()
    prompts, _ = synthesize_rows(
        ds.table, sample, seed=0, epoch=0, cfg=cfg, token_estimates=loader.token_estimates
    )
    t_synth = time.process_time() - t
    t = time.process_time()
    tokenize(prompts)
    t_tok = time.process_time() - t
    us = lambda x: round(x / len(sample) * 1e6)  # noqa: E731
    return {
        "stage_cpu_us_per_sample": {
            "read+crc+zstd": us(t_read),
            "synthesise": us(t_synth),
            "tokenize": us(t_tok),
        },
        "latent": [4, latent, latent],
        "compression": "zstd",
        "device_batch_size": batch,
        "num_workers": workers,
        "samples": n,
        "seconds": round(dt, 2),
        "samples_per_s": round(n / dt),
        "samples_per_s_per_worker": round(n / dt / max(workers, 1)),
        # CPU seconds of this process (workers=0): the rate one dedicated core sustains, independent
        # of how many other processes share the machine.
        "samples_per_cpu_s": round(n / cpu) if workers == 0 and cpu > 0 else None,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("estimate")
    e.add_argument("--rows", type=int, default=1_000_000)
    e.add_argument(
        "--max-words", type=int, default=170, help="caption length (cost is per row, not per byte)"
    )
    i = sub.add_parser("init")
    i.add_argument("--rows", type=int, default=13_000_000)
    i.add_argument("--max-words", type=int, default=12)
    i.add_argument("--world-size", type=int, default=32)
    i.add_argument("--device-batch-size", type=int, default=16)
    t = sub.add_parser("throughput")
    t.add_argument("--latent", type=int, default=8, help="latent side (8 = tiny, 128 = SDXL 1024px)")
    t.add_argument("--images", type=int, default=512)
    t.add_argument("--device-batch-size", type=int, default=16)
    t.add_argument("--batches", type=int, default=30)
    t.add_argument("--workers", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "estimate":
        r = bench_estimate(a.rows, a.max_words)
    elif a.cmd == "init":
        r = bench_loader_init(a.rows, a.max_words, a.world_size, a.device_batch_size)
    else:
        r = bench_throughput(a.latent, a.images, a.device_batch_size, a.batches, a.workers)
    json.dump(r, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
