"""`bigasp bench ingest`: the ingest header scan (images/s) over N generated small JPEGs.

Generates N distinct 256x192 JPEGs into a temp dir (untimed; they end up in the page cache,
so this measures CPU cost per image — hash, header probe, EXIF, end-marker check, Parquet
commits — not the disk), then times one `bigasp.prep.ingest.ingest` call into a fresh dataset
and an incremental re-run that finds nothing new. Target: ≥ 500 images/s on one core.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bigasp.bench.common import BenchResult, machine_info

TARGET_IMG_S = 500.0


def write_jpegs(root: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = [
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize(
            (256, 192), Image.Resampling.BILINEAR
        )
        for _ in range(min(n, 32))
    ]
    for i in range(n):
        im = base[i % len(base)].copy()
        im.putpixel((i % 256, (i // 256) % 192), (i % 256, (i // 65536) % 256, 255))  # distinct bytes
        d = root / f"{i // 1000:03d}"
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"img{i:06d}.jpg", quality=85, comment=f"bigasp bench {i}".encode())  # unique bytes


def run_ingest_bench(*, images: int, seed: int, command: str) -> BenchResult:
    from bigasp.prep.config import IngestConfig
    from bigasp.prep.ingest import ingest

    with tempfile.TemporaryDirectory(prefix="bigasp-bench-ingest-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "ds"
        t0 = time.perf_counter()
        write_jpegs(src, images, seed)
        gen_s = time.perf_counter() - t0
        cfg = IngestConfig(allow_upscale=True, progress=False)
        t0 = time.perf_counter()
        first = ingest([src], out, cfg)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = ingest([src], out, cfg)
        again_s = time.perf_counter() - t0
    img_s = first.scanned / first_s
    metrics = {
        "img_per_s": img_s,
        "ratio_to_target": img_s / TARGET_IMG_S,
        "ingested": first.new,
        "scanned": first.scanned,
        "seconds": first_s,
        "incremental_skipped": again.skipped,
        "incremental_s": again_s,
        "generate_s": gen_s,
    }
    return BenchResult(
        bench="ingest",
        config={"images": images, "seed": seed, "jpeg": "256x192 q85"},
        metrics=metrics,
        headline=[
            ("img_per_s", "img/s"),
            ("ratio_to_target", "x target (500)"),
            ("incremental_s", "s re-run"),
        ],
        command=command,
        machine=machine_info(torch.device("cpu")),
    )
