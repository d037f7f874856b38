"""Ingest header-scan throughput on N small JPEGs (for docs/PERFORMANCE.md "Ingest scan").

Generates N distinct 256x192 JPEGs (q85, ~10 KB) once under --dir, then times
`bigasp.prep.ingest.ingest` (content hash + header probe + EXIF + end-marker check + Parquet
commits) into a fresh dataset, and a second, incremental run that finds nothing new. Files
are in the page cache after generation, so this measures CPU cost, not disk.

    taskset -c 0 .venv/bin/python scripts/bench_ingest_scan.py [--n 10000] [--dir /tmp/bigasp-ingest-bench]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from bigasp.prep.config import IngestConfig
from bigasp.prep.ingest import ingest


def generate(root: Path, n: int) -> None:
    marker = root / f".done-{n}"
    if marker.exists():
        return
    rng = np.random.default_rng(0)
    base = [
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize(
            (256, 192), Image.Resampling.BILINEAR
        )
        for _ in range(50)
    ]
    for i in range(n):
        im = base[i % 50].copy()
        im.putpixel((i % 256, (i // 256) % 192), (i % 256, (i // 65536) % 256, 0))  # distinct bytes
        d = root / "src" / f"{i // 1000:03d}"
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"img{i:06d}.jpg", quality=85)
    marker.touch()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dir", default="/tmp/bigasp-ingest-bench")
    args = ap.parse_args()
    root = Path(args.dir)
    generate(root, args.n)
    out = root / "ds"
    shutil.rmtree(out, ignore_errors=True)
    cfg = IngestConfig(allow_upscale=True, progress=False)
    first = ingest([root / "src"], out, cfg)
    again = ingest([root / "src"], out, cfg)
    print(f"first scan: {first.new} images in {first.seconds:.2f} s = {first.images_per_second:,.0f} img/s")
    print(f"incremental re-run: {again.skipped} skipped in {again.seconds:.2f} s")


if __name__ == "__main__":
    main()
