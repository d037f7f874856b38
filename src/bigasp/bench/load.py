"""`bigasp bench load`: training data loader samples/s from a real latent store.

Writes a temporary dataset through the real store (`ShardWriter`, manifest) at one latent
size (SDXL: 128x128) with realistic captions and tags, then iterates the real `TrainLoader`
(prompt synthesis, tokenisation, chunking, latent reads with checksums, collate). With
`--workers 0` everything runs in this one process, so samples/s is what one CPU core
delivers — the "per worker" figure; with N workers it is divided by N.

With `url` (e.g. s3://bucket/prefix) the dataset is uploaded there and read back through the
object-storage path (local disk cache, plan-driven prefetch): one pass with an empty cache
(cold: every latent crosses the network) and the same batches again (warm: all from the cache).
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigasp.bench.common import BenchResult, machine_info


def write_bench_dataset(
    root: str | Path, *, n: int, height: int, width: int, seed: int = 0, shard_size: int | None = None
) -> Path:
    """`n` images of one `height`x`width` bucket, random fp16 latents, realistic text."""
    import pyarrow as pa

    from bigasp.bench.tokenize import _TAGS, realistic_prompts
    from bigasp.store import RecordMeta, ShardWriter, layout
    from bigasp.store.manifest import MANIFEST_SCHEMA, init_dataset

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    init_dataset(root)
    rng = np.random.default_rng(seed)
    rnd = random.Random(seed)
    captions = realistic_prompts(2 * n, seed=seed)
    writer = ShardWriter(root, "bench-000", height, width)
    rows = []
    for i in range(n):
        iid = f"{i:032x}"
        lat = rng.standard_normal((4, height // 8, width // 8), dtype=np.float32).astype(np.float16)
        if shard_size and len(writer) >= shard_size:
            writer.close()
            writer = ShardWriter(root, f"bench-{i:06d}", height, width)
        writer.add(lat, RecordMeta(iid, height, width, 0, 0))
        rows.append(
            {
                "id": iid,
                "path": f"/bench/{iid}.jpg",
                "width": width,
                "height": height,
                "captions": captions[2 * i : 2 * i + 2],
                "tags": rnd.sample(_TAGS, k=rnd.randint(8, 30)),
                "score": rnd.randint(1, 9),
                "source": "bench",
                "watermark": False,
                "extra": json.dumps({}),
            }
        )
    writer.close()
    layout.atomic_write_parquet(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), root / layout.MANIFEST)
    return root


def _config(latent: tuple[int, int], images: int, batch: int, workers: int, batches: int) -> dict:
    """The settings both load benches (local and object storage) report."""
    return {
        "latent_height": latent[0],
        "latent_width": latent[1],
        "images": images,
        "batch": batch,
        "workers": workers,
        "batches": batches,
    }


def run_load_bench(
    *,
    latent: tuple[int, int],
    images: int,
    batch: int,
    workers: int,
    batches: int,
    warmup: int,
    seed: int,
    command: str,
    root: str | None = None,
    url: str | None = None,
    storage_options: dict | None = None,
    prefetch: int = 64,
    concurrency: int = 32,
) -> BenchResult:
    from bigasp.store import LatentDataset
    from bigasp.train.data import DataConfig, TrainLoader

    if url:
        return _run_url_bench(
            latent=latent, images=images, batch=batch, workers=workers, batches=batches, seed=seed,
            command=command, url=url, storage_options=storage_options or {}, prefetch=prefetch,
            concurrency=concurrency,
        )  # fmt: skip

    h, w = latent[0] * 8, latent[1] * 8
    if workers == 0:
        torch.set_num_threads(1)  # the per-core figure: a DataLoader worker runs single-threaded too
    with tempfile.TemporaryDirectory(prefix="bigasp-bench-load-") as tmp:
        t0 = time.perf_counter()
        path = write_bench_dataset(root or tmp, n=images, height=h, width=w, seed=seed)
        write_s = time.perf_counter() - t0
        ds = LatentDataset(str(path))
        cfg = DataConfig(
            dataset=str(path),
            seed=seed,
            device_batch_size=batch,
            num_workers=workers,
            pin_memory=False,
            validation_size=0,
            stable_size=0,
        )
        loader = TrainLoader(ds, cfg, rank=0, world_size=1, seed=seed, device_batch_size=batch)
        it = iter(loader)
        for _ in range(warmup):  # worker start-up and first reads are not steady state
            next(it)
        n_samples = 0
        t0 = time.perf_counter()
        for _ in range(batches):
            b = next(it)
            n_samples += len(b)
        elapsed = time.perf_counter() - t0
        del it
    per_s = n_samples / elapsed
    metrics: dict[str, Any] = {
        "samples_per_s": per_s,
        "samples_per_s_per_worker": per_s / max(workers, 1),
        "ms_per_batch": elapsed / batches * 1000,
        "samples": n_samples,
        "latent_bytes": 4 * latent[0] * latent[1] * 2,
        "dataset_write_s": write_s,
        "target_per_worker": 1000.0,
        "ratio_to_target": per_s / max(workers, 1) / 1000.0,
    }
    return BenchResult(
        bench="load",
        config=_config(latent, images, batch, workers, batches),
        metrics=metrics,
        headline=[
            ("samples_per_s_per_worker", "samples/s/worker"),
            ("ratio_to_target", "x target (1,000)"),
            ("ms_per_batch", "ms/batch"),
        ],
        command=command,
        machine=machine_info(torch.device("cpu")),
    )


def _run_url_bench(
    *,
    latent: tuple[int, int],
    images: int,
    batch: int,
    workers: int,
    batches: int,
    seed: int,
    command: str,
    url: str,
    storage_options: dict,
    prefetch: int,
    concurrency: int,
) -> BenchResult:
    import uuid

    from bigasp.store import layout
    from bigasp.train.data import DataConfig, TrainLoader, open_dataset

    h, w = latent[0] * 8, latent[1] * 8
    if workers == 0:
        torch.set_num_threads(1)
    target = f"{url.rstrip('/')}/bench-load-{uuid.uuid4().hex[:8]}"
    fs, tpath = layout.url_to_fs(target, storage_options)
    with tempfile.TemporaryDirectory(prefix="bigasp-bench-load-") as tmp:
        # shards of 64 latents (8 MiB at 1024²), not one: a local test server copies a whole object per request
        path = write_bench_dataset(Path(tmp) / "ds", n=images, height=h, width=w, seed=seed, shard_size=64)
        t0 = time.perf_counter()
        fs.put(str(path), tpath, recursive=True)
        upload_s = time.perf_counter() - t0
        cfg = DataConfig(
            dataset=target,
            storage_options=storage_options,
            cache_dir=str(Path(tmp) / "cache"),
            prefetch_batches=prefetch,
            read_concurrency=concurrency,
            seed=seed,
            device_batch_size=batch,
            num_workers=workers,
            pin_memory=False,
            validation_size=0,
            stable_size=0,
        )

        def one_pass() -> tuple[float, int]:
            loader = TrainLoader(open_dataset(cfg), cfg, device_batch_size=batch)
            it = iter(loader)
            n = 0
            t = time.perf_counter()
            for _ in range(batches):
                n += len(next(it))
            elapsed = time.perf_counter() - t
            it.close()
            return elapsed, n

        cold_s, n_samples = one_pass()
        warm_s, _ = one_pass()
        from bigasp.store.cache import RecordCache

        cached = RecordCache(cfg.cache_dir, target, 1).size()
        fs.rm(tpath, recursive=True)
    latent_bytes = 4 * latent[0] * latent[1] * 2
    metrics: dict[str, Any] = {
        "cold_samples_per_s": n_samples / cold_s,
        "warm_samples_per_s": n_samples / warm_s,
        "cold_samples_per_s_per_worker": n_samples / cold_s / max(workers, 1),
        "warm_samples_per_s_per_worker": n_samples / warm_s / max(workers, 1),
        "cold_MB_per_s": n_samples * latent_bytes / cold_s / 1e6,
        "samples": n_samples,
        "latent_bytes": latent_bytes,
        "cache_bytes": cached,
        "upload_s": upload_s,
    }
    return BenchResult(
        bench="load",
        config={
            **_config(latent, images, batch, workers, batches),
            "url": url,
            "prefetch_batches": prefetch,
            "read_concurrency": concurrency,
        },
        metrics=metrics,
        headline=[
            ("cold_samples_per_s_per_worker", "samples/s/worker cold cache"),
            ("warm_samples_per_s_per_worker", "samples/s/worker warm cache"),
            ("cold_MB_per_s", "MB/s from storage (cold)"),
        ],
        command=command,
        machine=machine_info(torch.device("cpu")),
    )
