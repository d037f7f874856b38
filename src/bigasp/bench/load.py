"""`bigasp bench load`: training data loader samples/s from a real latent store.

Writes a temporary dataset through the real store (`ShardWriter`, manifest) at one latent
size (SDXL: 128x128) with realistic captions and tags, then iterates the real `TrainLoader`
(prompt synthesis, tokenisation, chunking, latent reads with checksums, collate). With
`--workers 0` everything runs in this one process, so samples/s is what one CPU core
delivers — the "per worker" figure; with N workers it is divided by N.
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


def write_bench_dataset(root: str | Path, *, n: int, height: int, width: int, seed: int = 0) -> Path:
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
) -> BenchResult:
    from bigasp.store import LatentDataset
    from bigasp.train.data import DataConfig, TrainLoader

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
        config={
            "latent_height": latent[0],
            "latent_width": latent[1],
            "images": images,
            "batch": batch,
            "workers": workers,
            "batches": batches,
        },
        metrics=metrics,
        headline=[
            ("samples_per_s_per_worker", "samples/s/worker"),
            ("ratio_to_target", "x target (1,000)"),
            ("ms_per_batch", "ms/batch"),
        ],
        command=command,
        machine=machine_info(torch.device("cpu")),
    )
