"""Learned-behaviour figures for the demo, measured on generated images without a network.

The synthetic photos make these simple and honest: one saturated shape near the centre of a
plain, desaturated background, so the foreground of any image is the pixels that differ from
its border colour, and pulling an image toward grey (washed out) keeps every pixel's hue.
- foreground: pixels whose RGB distance from the median border colour is at least half the
  image's 99th-percentile distance (and at least MIN_DISTANCE), with some saturation left;
- colour: the most common palette hue among foreground pixels (chance = 1/len(palette));
- shape: the foreground mask's width profile at 20/50/80% of its height, matched to the
  ideal profiles of square (1, 1, 1), circle (0.8, 1, 0.8) and upright triangle
  (0.2, 0.5, 0.8);
- contrast: RMS contrast, the standard deviation of the pixel values per channel, averaged
  over R, G, B (washing out by a factor k multiplies it by k: the degradation the low scores had);
- sharpness: variance of the Laplacian of the grey image (blur lowers it sharply).
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bigasp.demo.synthetic import COLOURS

# A pixel is foreground when it stands out from the border colour and keeps some saturation.
MIN_DISTANCE = 15.0  # RGB distance (0-255 units) below which nothing stands out
RELATIVE_DISTANCE = 0.5  # of the image's 99th-percentile distance from the border colour
MIN_SATURATION = 0.08  # hue is meaningless on grey pixels
MIN_FOREGROUND = 0.02  # share of pixels below which an image "has no shape"

SHAPE_PROFILES: dict[str, tuple[float, float, float]] = {
    "square": (1.0, 1.0, 1.0),
    "circle": (0.8, 1.0, 0.8),
    "triangle": (0.2, 0.5, 0.8),
}


def _hsv(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB").convert("HSV"), dtype=np.float32) / 255.0


def border_colour(rgb: np.ndarray) -> np.ndarray:
    """Median colour of the outermost pixel ring (the background: shapes sit near the centre)."""
    ring = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    return np.median(ring, axis=0)


def foreground_mask(img: Image.Image) -> np.ndarray:
    """Boolean [H, W]: pixels that stand out from the border colour and are not grey."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    dist = np.linalg.norm(rgb - border_colour(rgb), axis=2)
    cut = max(MIN_DISTANCE, RELATIVE_DISTANCE * float(np.percentile(dist, 99)))
    return (dist >= cut) & (_hsv(img)[..., 1] >= MIN_SATURATION)


def _palette_hues(palette: Mapping[str, tuple[int, int, int]]) -> dict[str, float]:
    return {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in palette.items()}


def dominant_colour(img: Image.Image, palette: Mapping[str, tuple[int, int, int]] = COLOURS) -> str | None:
    """Palette name most foreground pixels are closest to in hue; None if there is no foreground."""
    hsv = _hsv(img)
    mask = foreground_mask(img)
    if mask.mean() < MIN_FOREGROUND:
        return None
    hues = hsv[..., 0][mask]
    names = list(palette)
    ref = np.array([_palette_hues(palette)[n] for n in names], dtype=np.float32)
    d = np.abs(hues[:, None] - ref[None, :])
    d = np.minimum(d, 1.0 - d)  # hue is circular
    counts = np.bincount(d.argmin(axis=1), minlength=len(names))
    return names[int(counts.argmax())]


def classify_shape(img: Image.Image) -> str | None:
    """Nearest ideal width profile of the foreground mask; None if there is no foreground."""
    mask = foreground_mask(img)
    if mask.mean() < MIN_FOREGROUND:
        return None
    ys, xs = np.nonzero(mask)
    # Robust extent: ignore the few stray pixels a generated image may have.
    top, bottom = np.percentile(ys, [1, 99])
    left, right = np.percentile(xs, [1, 99])
    width = max(right - left + 1, 1.0)
    profile = []
    for frac in (0.2, 0.5, 0.8):
        row = int(top + frac * (bottom - top) + 0.5)
        profile.append(mask[row].sum() / width)
    p = np.array(profile)
    return min(SHAPE_PROFILES, key=lambda s: float(np.abs(p - np.array(SHAPE_PROFILES[s])).sum()))


def sharpness(img: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the luminance (0–255 scale)."""
    g = np.asarray(img.convert("L"), dtype=np.float64)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def rms_contrast(img: Image.Image) -> float:
    """Standard deviation of the pixel values (0-255) per channel, averaged over R, G, B."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    return float(rgb.std(axis=0).mean())


@dataclass(frozen=True)
class Adherence:
    """Share of images whose measured attribute equals the prompted one."""

    correct: int
    total: int
    chance: float

    @property
    def rate(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.rate:.0%} ({self.correct}/{self.total}; chance {self.chance:.0%})"


def colour_adherence(
    images: Sequence[Image.Image],
    colours: Sequence[str],
    palette: Mapping[str, tuple[int, int, int]] = COLOURS,
) -> Adherence:
    if len(images) != len(colours):
        raise ValueError(f"{len(images)} images but {len(colours)} prompted colours")
    ok = sum(dominant_colour(im, palette) == c for im, c in zip(images, colours, strict=True))
    return Adherence(ok, len(images), 1.0 / len(palette))


def shape_adherence(images: Sequence[Image.Image], shapes: Sequence[str]) -> Adherence:
    if len(images) != len(shapes):
        raise ValueError(f"{len(images)} images but {len(shapes)} prompted shapes")
    ok = sum(classify_shape(im) == s for im, s in zip(images, shapes, strict=True))
    return Adherence(ok, len(images), 1.0 / len(SHAPE_PROFILES))


@dataclass(frozen=True)
class _Gap:
    """One measure averaged over two sets of generations (same prompts and seeds but for one change)."""

    high: float
    low: float

    @property
    def ratio(self) -> float:
        return self.high / self.low if self.low > 0 else float("inf")


class SharpnessGap(_Gap):
    """Mean Laplacian variance for high- vs low-score prompts; ratio > 1 means score tags work."""

    def __str__(self) -> str:
        return f"high-score {self.high:.0f} vs low-score {self.low:.0f} (ratio {self.ratio:.2f}x)"


def sharpness_gap(high: Sequence[Image.Image], low: Sequence[Image.Image]) -> SharpnessGap:
    if not high or not low:
        raise ValueError("sharpness_gap needs at least one high- and one low-score image")
    return SharpnessGap(
        float(np.mean([sharpness(i) for i in high])), float(np.mean([sharpness(i) for i in low]))
    )


class ContrastGap(_Gap):
    """Mean RMS contrast of two sets of generations; ratio > 1 means the first set is crisper, as
    photos with high scores were."""

    def __str__(self) -> str:
        return f"{self.high:.1f} vs {self.low:.1f} (ratio {self.ratio:.2f}x)"


def contrast_gap(high: Sequence[Image.Image], low: Sequence[Image.Image]) -> ContrastGap:
    if not high or not low:
        raise ValueError("contrast_gap needs at least one image on each side")
    return ContrastGap(
        float(np.mean([rms_contrast(i) for i in high])), float(np.mean([rms_contrast(i) for i in low]))
    )
