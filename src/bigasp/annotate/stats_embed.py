"""`embed.model = "builtin:image-stats"`: image statistics as the embedding, a stand-in for CLIP.

The demo and small experiments have no CLIP ViT-B/32 to download. This embedder measures 20
statistics: the quality study's 14 (`bigasp.quality.study.StatsEmbedder`: sharpness, noise, JPEG
blockiness, luminance spread, colour) and 6 of contrast and saturation (per-channel spread, the
luminance range, the 95th percentile of saturation, the largest distance from the mean colour),
standardised on a fixed calibration set and mixed into 64 values by a fixed random projection. It is informative about image quality by construction, so a quality pipeline built
on it shows what the *learning and ranking* steps recover; it says nothing about what CLIP sees.
The statistics are computed in the decode workers (`prepare`), the projection in `run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from bigasp import __version__

BUILTIN_STATS = "builtin:image-stats"
STATS_DIM = 64
STATS_SEED = 0


def is_builtin_stats(spec: str | None) -> bool:
    return spec == BUILTIN_STATS


N_FEATURES = 20


def features(im: Image.Image) -> np.ndarray:
    """The 20 statistics of one image, measured as it is (no resize)."""
    from bigasp.quality.study import StatsEmbedder

    rgb = im.convert("RGB")
    a = np.asarray(rgb, np.float32) / 255.0
    sat = np.asarray(rgb.convert("HSV"), np.float32)[..., 1] / 255.0
    lum = a.mean(2)
    eps = 1e-3
    contrast = [
        *np.log(a.reshape(-1, 3).std(0) + eps),  # per-channel RMS contrast
        np.log(np.percentile(sat, 95) + eps),  # how vivid the most coloured part is
        np.log(np.percentile(lum, 99) - np.percentile(lum, 1) + eps),  # luminance range
        np.log(np.abs(a - a.mean((0, 1))).max() + eps),  # farthest pixel from the mean colour
    ]
    return np.concatenate([StatsEmbedder.features(rgb), np.asarray(contrast, np.float32)]).astype(np.float32)


@dataclass
class StatsPrepare:
    """Worker side: the statistics of one image."""

    def __call__(self, im: Image.Image) -> np.ndarray:
        return features(im)


def _calibration() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, projection): standardisation from the quality study's synthetic photos, each also
    washed out by a keyed contrast in [0.2, 1] (its own key: never a dataset's images)."""
    from bigasp.demo.synthetic import washed_out
    from bigasp.quality.keys import key64, rng
    from bigasp.quality.study import world

    images, _ = world(96, seed=key64(STATS_SEED, "image-stats-calibration") % (2**31))
    g = rng(STATS_SEED, "image-stats-contrast")
    f = np.stack([features(washed_out(im, float(g.uniform(0.2, 1.0)))) for im in images])
    proj = rng(STATS_SEED, "image-stats-projection").normal(0, 1, (N_FEATURES, STATS_DIM)) / np.sqrt(
        N_FEATURES
    )
    return f.mean(0), f.std(0) + 1e-6, proj.astype(np.float32)


class ImageStatsEmbedder:
    """The annotator interface of `ClipEmbedder` over `StatsEmbedder` (fixed seed and size)."""

    stage = "embed"

    def __init__(self, cfg, device=None):
        from bigasp.store.annotations import check_key

        self.mean, self.std, self.proj = _calibration()
        self.cfg = cfg
        self.key = check_key("model key", cfg.key or "image-stats")
        self.prepare = StatsPrepare()
        self.input_side = 64
        self.dim = STATS_DIM
        self.schema = pa.schema([pa.field("embedding", pa.list_(pa.float16(), self.dim))])
        self.provenance: dict[str, Any] = {
            "stage": "embed",
            "model": BUILTIN_STATS,
            "model_path": BUILTIN_STATS,
            "model_key": self.key,
            "files": {},
            "settings": {"output": f"{N_FEATURES} standardised statistics x fixed random projection", "dim": STATS_DIM,
                         "seed": STATS_SEED},
            "bigasp_version": __version__,
        }  # fmt: skip

    def project(self, feats: np.ndarray) -> np.ndarray:
        return (((feats - self.mean) / self.std) @ self.proj).astype(np.float16)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """Embed PIL images directly (the quality stage's blurred and JPEG copies)."""
        if not images:
            return np.zeros((0, self.dim), np.float16)
        return self.project(np.stack([features(im) for im in images]))

    def run(self, inputs: np.ndarray, sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
        return [{"embedding": v} for v in self.project(np.asarray(inputs, np.float32))]

    def table(self, ids: list[str], rows: list[dict[str, Any]]) -> pa.Table:
        from bigasp.store.annotations import embeddings_table

        vecs = np.stack([r["embedding"] for r in rows]) if rows else np.zeros((0, self.dim), np.float16)
        return embeddings_table(ids, vecs)
