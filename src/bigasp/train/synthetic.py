"""A small latent dataset with learnable structure, written through the real store (no VAE needed).

Used by the trainer tests and `configs/tiny.toml` so the training loop can be exercised on a
CPU in seconds: each image's latent is a smooth per-colour pattern plus a little noise, and its
caption names the colour, so a tiny UNet can visibly learn (validation loss falls) and the
text conditioning matters.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

COLOURS = ("red", "green", "blue", "yellow")


def _pattern(colour: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    base = [np.sin(np.pi * (xx + colour / 4)), np.cos(np.pi * yy), xx * yy, np.full_like(xx, 0.5)]
    sign = 1.0 if colour % 2 == 0 else -1.0
    return (sign * np.stack(base)).astype(np.float32)


def write_synthetic_latent_dataset(
    root: str | os.PathLike,
    *,
    n: int = 64,
    height: int = 64,
    width: int = 64,
    seed: int = 0,
    original: tuple[int, int] | None = None,
    crop: tuple[int, int] = (0, 0),
    sources: tuple[str, ...] = (),
    shard_size: int | None = None,
    id_prefix: str = "img",
    header: dict | None = None,
) -> Path:
    """Write `n` images of one `height` x `width` bucket (latent 4 x h/8 x w/8) to `root`.

    `original` = (height, width) of the (pretend) source image, default twice the bucket;
    `crop` = (top, left) of the bucket crop: SDXL's size conditioning for every image.
    `sources`: image i's manifest `source` is `sources[i % len(sources)]` (none when empty).
    `shard_size`: images per shard (default: one shard), as an encoder publishing shard by shard.
    `id_prefix`: image i's id is `{id_prefix}{i:05d}` (datasets written with one prefix share ids).
    `header`: extra shard header fields, e.g. the encoding (`vae_id`, `scaling_factor`, ...) encode records.
    """
    orig_h, orig_w = original if original is not None else (height * 2, width * 2)
    from bigasp.store import RecordMeta, ShardWriter, layout
    from bigasp.store.manifest import MANIFEST_SCHEMA, init_dataset

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    init_dataset(root)
    rng = np.random.default_rng(seed)
    per = shard_size or max(n, 1)
    writer = None
    rows = []
    for i in range(n):
        if i % per == 0:
            if writer is not None:
                writer.close()
            writer = ShardWriter(root, f"synthetic-{i // per:03d}", height, width, header=header)
        colour = i % len(COLOURS)
        lat = _pattern(colour, height // 8, width // 8) + 0.1 * rng.standard_normal(
            (4, height // 8, width // 8)
        )
        iid = f"{id_prefix}{i:05d}"
        writer.add(lat.astype(np.float16), RecordMeta(iid, orig_h, orig_w, crop[0], crop[1]))
        name = COLOURS[colour]
        rows.append(
            {
                "id": iid,
                "path": f"/synthetic/{iid}.png",
                "width": orig_w,
                "height": orig_h,
                "captions": [f"a {name} pattern", f"photo of a {name} pattern, smooth gradient"],
                "tags": [name, "pattern", "gradient"],
                "score": 5 + colour,
                "source": sources[i % len(sources)] if sources else None,
                "extra": "{}",
            }
        )
    if writer is not None:
        writer.close()
    layout.atomic_write_parquet(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), root / layout.MANIFEST)
    return root
