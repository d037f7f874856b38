"""`bench ingest --url` / `bench encode --url`: photos in object storage, read by one rank.

Generates img2dataset-style webdataset shards (`key.jpg` + `key.txt` + `key.json`) of distinct
768x576 JPEGs (untimed), uploads them under `--url` (with `--local-s3`, to a local S3 API server
that delays every request by `--latency-ms`, as a far-away bucket would), then times:

- ingest: one `ingest` of the brace-ranged shard URLs with the shard read-ahead on
  (`ingest.prefetch`, default 2) and off (0): images/s of this one rank, and the bytes fetched
  per image against the image's stored size (every shard byte once: image + sidecars + headers);
- encode: `encode` (tiny VAE, CPU) of the ingested dataset, which fetches each photo with one
  ranged GET of its byte range: images/s with DataLoader workers reading ahead (`--workers`)
  and without (0), and the bytes fetched per image (measured in the process, workers = 0).

A rank of an N-rank job reads only its own shards / photos, so these per-rank figures are what
each of N ranks gets (the bucket's own bandwidth aside).
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigasp.bench.common import BenchResult, machine_info


def _jpegs(n: int, seed: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = [
        Image.fromarray(rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)).resize(
            (768, 576), Image.Resampling.BILINEAR
        )
        for _ in range(min(n, 16))
    ]
    out = []
    for i in range(n):
        buf = io.BytesIO()
        base[i % len(base)].save(buf, "JPEG", quality=85, comment=f"bigasp bench {i}".encode())
        out.append(buf.getvalue())
    return out


def write_shards(
    url: str, opts: dict[str, Any], shards: int, per_shard: int, seed: int
) -> tuple[str, int, int]:
    """Upload `shards` img2dataset-layout tars; returns (brace URL, image bytes, shard bytes)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **opts)
    images = _jpegs(shards * per_shard, seed)
    image_bytes = shard_bytes = 0
    for s in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for k in range(per_shard):
                i = s * per_shard + k
                key = f"{s:05d}{k:04d}"
                meta = {"url": f"https://example.com/{i}.jpg", "caption": f"photo {i}", "key": key, "status": "success",
                        "width": 768, "height": 576}  # fmt: skip
                for ext, data in (
                    ("jpg", images[i]),
                    ("txt", f"photo {i}".encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 1_700_000_000
                    tf.addfile(info, io.BytesIO(data))
                image_bytes += len(images[i])
        fs.pipe_file(f"{root.rstrip('/')}/{s:05d}.tar", buf.getvalue())
        shard_bytes += len(buf.getvalue())
    return f"{url.rstrip('/')}/{{00000..{shards - 1:05d}}}.tar", image_bytes, shard_bytes


def _encode_reads(ds: Path, buckets, workers: int) -> dict[str, float]:
    """The encode stage's photo input (plan, one ranged GET per photo, decode, resize and crop to
    its bucket, as `encode` feeds the VAE), with `workers` DataLoader processes reading ahead and
    with none; the VAE itself is what the plain `bench encode` times."""
    from torch.utils.data import DataLoader

    from bigasp.buckets import BucketSet
    from bigasp.prep.encode import PLAN_COLUMNS, DecodeDataset, bucket_batches, collate, plan
    from bigasp.store import layout, remote
    from bigasp.store.manifest import read_manifest

    jobs = plan(
        read_manifest(*layout.url_to_fs(str(ds)), columns=list(PLAN_COLUMNS)), BucketSet(buckets.buckets()), 0
    )
    out: dict[str, float] = {}
    for name, w in (("no_prefetch", 0), ("prefetch", workers)):
        before = remote.stats()["bytes"]
        loader = DataLoader(DecodeDataset(jobs, 1.0, 1 << 30), batch_sampler=bucket_batches(jobs, 8), num_workers=w,
                            collate_fn=collate, prefetch_factor=4 if w > 0 else None)  # fmt: skip
        t0 = time.perf_counter()
        done = sum(len(idx) for idx, _, _, _ in loader)
        out[f"{name}_img_per_s"] = done / (time.perf_counter() - t0)
        if w == 0:  # workers count their own fetches; this process's are the whole figure only here
            out["fetched_per_image_bytes"] = (remote.stats()["bytes"] - before) / sum(
                j.ref.size for j in jobs
            )
    return out


def run_url_bench(
    *,
    stage: str,
    url: str,
    storage_options: dict[str, Any],
    shards: int,
    per_shard: int,
    workers: int,
    seed: int,
    latency_ms: float,
    command: str,
) -> BenchResult:
    from bigasp.buckets import BucketConfig
    from bigasp.prep.config import IngestConfig
    from bigasp.prep.ingest import ingest
    from bigasp.store import remote

    brace, image_bytes, shard_bytes = write_shards(url, storage_options, shards, per_shard, seed)
    n = shards * per_shard
    buckets = BucketConfig(step=64, min_area=256 * 256, max_area=512 * 512)
    metrics: dict[str, Any] = {"images": n, "image_bytes": image_bytes, "shard_bytes": shard_bytes}
    remote.configure(storage_options)
    remote.info(f"{url.rstrip('/')}/00000.tar")  # untimed: the first connection
    with tempfile.TemporaryDirectory(prefix="bigasp-bench-url-") as tmp:
        # untimed first: imports, connections and the bucket's first listing are not in the figures
        ingest([f"{url.rstrip('/')}/00000.tar"], Path(tmp) / "warm", IngestConfig(
            buckets=buckets, allow_upscale=True, progress=False, storage_options=storage_options))  # fmt: skip
        runs = [("no_prefetch", 0), ("prefetch", 2)] if stage == "ingest" else [("prefetch", 2)]
        for name, depth in runs:
            cfg = IngestConfig(
                buckets=buckets,
                allow_upscale=True,
                progress=False,
                storage_options=storage_options,
                prefetch=depth,
            )
            t0 = time.perf_counter()
            s = ingest([brace], Path(tmp) / f"ds-{name}", cfg)
            secs = time.perf_counter() - t0
            if stage == "ingest":
                metrics[f"{name}_img_per_s"] = s.new / secs
                metrics[f"{name}_fetched_per_image_bytes"] = s.fetched / image_bytes
                metrics[f"{name}_fetched_per_shard_bytes"] = s.fetched / shard_bytes
        if stage == "encode":
            metrics.update(_encode_reads(Path(tmp) / "ds-prefetch", buckets, workers))
    if stage == "ingest":
        headline = [("prefetch_img_per_s", "img/s prefetch"), ("no_prefetch_img_per_s", "img/s no prefetch"),
                    ("prefetch_fetched_per_image_bytes", "x image bytes fetched")]  # fmt: skip
    else:
        headline = [("prefetch_img_per_s", f"img/s {workers} workers"), ("no_prefetch_img_per_s", "img/s 0 workers"),
                    ("fetched_per_image_bytes", "x image bytes fetched")]  # fmt: skip
    return BenchResult(
        bench=stage,
        config={
            "shards": shards,
            "per_shard": per_shard,
            "latency_ms": latency_ms,
            "workers": workers,
            "jpeg": "768x576 q85",
            "layout": "img2dataset (jpg + txt + json)",
            "source": "url",
        },
        metrics=metrics,
        headline=headline,
        command=command,
        machine=machine_info(torch.device("cpu")),
    )
