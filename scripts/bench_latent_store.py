"""Latent store: space saved by zstd and the read cost per latent (for docs/PERFORMANCE.md).

Writes the same synthetic SDXL-size latents (4x128x128 fp16, i.e. a 1024x1024 bucket) into
an uncompressed and a zstd dataset, then times `LatentDataset.read_latent` (read + crc32 +
decompress) over every record in a random order. Two kinds of latents bracket real ones:
i.i.d. N(0,1) values (nothing to exploit but the fp16 exponent distribution) and a
spatially smooth N(0,1) field (closer to VAE latents of photos).

    .venv/bin/python scripts/bench_latent_store.py [--n 256] [--level 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bigasp.store import LatentDataset, RecordMeta, ShardWriter, layout
from bigasp.store.manifest import MANIFEST_SCHEMA, init_dataset


def latents(n: int, smooth: bool, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(128)
    kernel = np.exp(-(f[:, None] ** 2 + f[None] ** 2) * 4000)
    out = []
    for _ in range(n):
        x = rng.standard_normal((4, 128, 128))
        if smooth:
            x = np.real(np.fft.ifft2(np.fft.fft2(x) * kernel))
            x /= x.std()
        out.append(x.astype(np.float16))
    return out


def build(root: Path, lats: list[np.ndarray], compression: str, level: int) -> float:
    init_dataset(root)
    w = ShardWriter(root, "bench", 1024, 1024, compression=compression, level=level)
    t = time.perf_counter()
    for i, lat in enumerate(lats):
        w.add(lat, RecordMeta(f"{i:08d}", 1024, 1024, 0, 0))
    w.close()
    elapsed = time.perf_counter() - t
    rows = [{"id": f"{i:08d}", "captions": [], "tags": [], "extra": "{}"} for i in range(len(lats))]
    layout.atomic_write_parquet(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), root / layout.MANIFEST)
    return elapsed / len(lats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--level", type=int, default=3)
    args = ap.parse_args()
    print("| latents | compression | bytes/latent | saved | write ms/latent | read ms/latent | reads/s |")
    print("|---|---|---|---|---|---|---|")
    for kind, smooth in (("iid N(0,1)", False), ("smooth N(0,1)", True)):
        lats = latents(args.n, smooth)
        raw = lats[0].nbytes
        for comp in ("none", "zstd"):
            with tempfile.TemporaryDirectory() as d:
                wt = build(Path(d), lats, comp, args.level)
                ds = LatentDataset(d)
                size = int(np.sum(ds.table.column("length").to_numpy())) / len(ds)
                order = np.random.default_rng(1).permutation(len(ds))
                for i in order[:8]:
                    ds.read_latent(int(i))  # warm the page cache and file handle
                t = time.perf_counter()
                for i in order:
                    ds.read_latent(int(i))
                rt = (time.perf_counter() - t) / len(ds)
                label = comp if comp == "none" else f"zstd-{args.level} (byte-shuffled)"
                print(
                    f"| {kind} | {label} | {size:,.0f} | {100 * (1 - size / raw):.1f}% | {wt * 1e3:.2f} | "
                    f"{rt * 1e3:.3f} | {1 / rt:,.0f} |"
                )
    codecs(min(args.n, 64), args.level)


def codecs(n: int, level: int) -> None:
    """Codec alone (no file I/O): bigASP's gzip-9 vs zstd with and without the byte shuffle."""
    import gzip

    import zstandard

    from bigasp.store.shard import decode_record, encode_record

    z = zstandard.ZstdCompressor(level=level)
    d = zstandard.ZstdDecompressor()
    shape = (4, 128, 128)
    table = (
        ("gzip-9 (bigASP)", lambda a: gzip.compress(a.tobytes(), 9), gzip.decompress),
        (f"zstd-{level} unshuffled", lambda a: z.compress(a.tobytes()), d.decompress),
        (
            f"zstd-{level} byte-shuffled (store)",
            lambda a: encode_record(a, "zstd", level, z),
            lambda b: decode_record(b, "zstd", shape, dctx=d),
        ),
    )
    print("\n| latents | codec | saved | decode ms/latent |")
    print("|---|---|---|---|")
    for kind, smooth in (("iid N(0,1)", False), ("smooth N(0,1)", True)):
        lats = latents(n, smooth, seed=2)
        for label, comp, dec in table:
            blobs = [comp(a) for a in lats]
            t = time.perf_counter()
            for b in blobs:
                dec(b)
            dt = (time.perf_counter() - t) / len(blobs)
            saved = 1 - sum(map(len, blobs)) / (len(lats) * lats[0].nbytes)
            print(f"| {kind} | {label} | {100 * saved:.1f}% | {dt * 1e3:.3f} |")


if __name__ == "__main__":
    main()
