"""Deterministic synthetic "photos" for the demo: coloured shapes on plain backgrounds.

The data is chosen so that learning is *measurable* without a classifier network:
foreground colours are saturated, well-separated hues and backgrounds are desaturated, so a
generated image's foreground is simply its saturated pixels (see `bigasp.demo.metrics`).
Degraded copies (blur / noise / JPEG) carry low scores, so score tags should map to
sharpness. Every image is a pure function of `(seed, index)`; the whole set is
reproducible byte for byte. Only Pillow and numpy are used.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Saturated foreground hues, far apart on the hue circle (chance adherence = 1/len).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "yellow": (230, 200, 30),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Desaturated backgrounds: HSV saturation stays well below any foreground colour's.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (232, 232, 228),
    "grey": (128, 128, 132),
    "dark": (40, 42, 46),
    "beige": (205, 195, 170),
}
DEGRADATIONS: tuple[str, ...] = ("blur", "noise", "jpeg")
# Aspect ratios (width/height) of the generated photos: square, portrait and landscape,
# plus in-between ratios that the bucket fit must crop.
ASPECTS: tuple[float, ...] = (1.0, 0.6, 1 / 0.6, 0.8, 1.25)


@dataclass(frozen=True)
class PhotoSpec:
    """Everything needed to draw one photo and write its sidecar."""

    index: int
    colour: str
    shape: str
    background: str
    width: int
    height: int
    cx: float  # shape centre, fraction of width
    cy: float  # shape centre, fraction of height
    size: float  # shape extent, fraction of min(width, height)
    degradation: str | None
    score: int

    @property
    def name(self) -> str:
        return f"{self.index:05d}_{self.colour}_{self.shape}"


def _rng(seed: int, index: int) -> np.random.Generator:
    # Keyed per image, never a process-global RNG: any subset can be regenerated alone.
    return np.random.default_rng([seed, index, 0x5EED])


def photo_spec(index: int, *, seed: int = 0, base: int = 64, degraded_fraction: float = 0.3) -> PhotoSpec:
    """The spec of photo `index`. Colour and shape cycle so every combination is balanced.

    `base` is the side of the square bucket the photos are meant for; photos are 1.0–1.5×
    that area times 1.25–1.6², so the bucket fit only ever downscales (no upscaling reject).
    """
    rng = _rng(seed, index)
    colour = tuple(COLOURS)[index % len(COLOURS)]
    shape = SHAPES[(index // len(COLOURS)) % len(SHAPES)]
    background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    aspect = ASPECTS[int(rng.integers(len(ASPECTS)))]
    area = (base * float(rng.uniform(1.25, 1.6))) ** 2
    width = round(math.sqrt(area * aspect))
    height = round(math.sqrt(area / aspect))
    size = float(rng.uniform(0.45, 0.65))
    cx = float(rng.uniform(0.4, 0.6))
    cy = float(rng.uniform(0.4, 0.6))
    degraded = rng.random() < degraded_fraction
    degradation = DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))] if degraded else None
    score = int(rng.integers(1, 4)) if degraded else int(rng.integers(6, 10))
    return PhotoSpec(index, colour, shape, background, width, height, cx, cy, size, degradation, score)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices for square/triangle (pixel coords, half-extent r); None for circle."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def draw_shape(
    width: int,
    height: int,
    shape: str,
    colour: tuple[int, int, int],
    background: tuple[int, int, int],
    *,
    cx: float = 0.5,
    cy: float = 0.5,
    size: float = 0.55,
) -> Image.Image:
    """A clean, anti-aliased shape on a flat background (4× supersampled then reduced)."""
    ss = 4
    img = Image.new("RGB", (width * ss, height * ss), background)
    draw = ImageDraw.Draw(img)
    r = size * min(width, height) * ss / 2
    x, y = cx * width * ss, cy * height * ss
    poly = shape_polygon(shape, x, y, r)
    if poly is None:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    else:
        draw.polygon(poly, fill=colour)
    return img.resize((width, height), Image.Resampling.LANCZOS)


def _degrade(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.5, 3.0))))
    if kind == "noise":
        arr = np.asarray(img).astype(np.float32)
        arr += rng.normal(0.0, float(rng.uniform(20, 35)), arr.shape)
        blurred = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        return blurred.filter(ImageFilter.GaussianBlur(radius=1.0))
    if kind == "jpeg":
        import io

        small = img.resize((max(8, img.width // 3), max(8, img.height // 3)), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        small.resize(img.size, Image.Resampling.BILINEAR).save(buf, "JPEG", quality=int(rng.integers(5, 15)))
        buf.seek(0)
        return Image.open(buf).convert("RGB")
    raise ValueError(f"unknown degradation {kind!r}")


def render(spec: PhotoSpec, *, seed: int = 0) -> Image.Image:
    """Draw the photo described by `spec` (deterministic)."""
    rng = np.random.default_rng([seed, spec.index, 0xD1CE])
    jitter = rng.integers(-12, 13, size=3)
    bg = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(BACKGROUNDS[spec.background], jitter, strict=True))
    img = draw_shape(
        spec.width, spec.height, spec.shape, COLOURS[spec.colour], bg, cx=spec.cx, cy=spec.cy, size=spec.size
    )
    if spec.degradation is not None:
        img = _degrade(img, spec.degradation, rng)
    return img


_QUALITY_WORDS = {"blur": "blurry", "noise": "noisy", "jpeg": "low quality jpeg"}


def caption(spec: PhotoSpec, *, variant: int = 0) -> str:
    """A natural-language caption; `variant` picks one of several phrasings."""
    thing = f"{spec.colour} {spec.shape}"
    bg = f"{spec.background} background"
    quality = f"{_QUALITY_WORDS[spec.degradation]} " if spec.degradation else ""
    forms = (
        f"A {quality}photo of a {thing} on a {bg}.",
        f"A {thing} centred on a plain {bg}, {quality or 'sharp '}photograph.",
        f"This {quality}image shows a single {thing} against a {bg}.",
    )
    return forms[variant % len(forms)]


def tags(spec: PhotoSpec) -> list[str]:
    """Booru-style tags (underscored, as tag datasets write them)."""
    out = [
        f"{spec.colour}_{spec.shape}",
        spec.shape,
        spec.colour,
        f"{spec.background}_background",
        "simple_background",
    ]
    if spec.degradation == "blur":
        out.append("blurry")
    elif spec.degradation == "noise":
        out.append("noisy")
    elif spec.degradation == "jpeg":
        out.append("jpeg_artifacts")
    return out


def sidecar(spec: PhotoSpec) -> dict:
    """Sidecar JSON contents: two captions, tags, score and provenance extras."""
    return {
        "captions": [caption(spec, variant=spec.index), caption(spec, variant=spec.index + 1)],
        "tags": tags(spec),
        "score": spec.score,
        "source": "bigasp-demo",
        "watermark": False,
        "demo": {"colour": spec.colour, "shape": spec.shape, "degradation": spec.degradation},
    }


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False)
    return buf.getvalue()


BROKEN_FILES: tuple[tuple[str, str], ...] = (
    ("broken_zero_bytes.png", "zero-byte file"),
    ("broken_truncated.jpg", "truncated JPEG"),
    ("broken_not_an_image.png", "text file with an image extension"),
)


def _broken_payloads(seed: int, base: int) -> dict[str, bytes]:
    import io

    img = render(photo_spec(0, seed=seed, base=base), seed=seed)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    return {
        "broken_zero_bytes.png": b"",
        "broken_truncated.jpg": jpeg[: len(jpeg) // 3],
        "broken_not_an_image.png": b"this is not an image, it only has a .png name\n",
    }


@dataclass(frozen=True)
class SyntheticSet:
    """What `write_photos` produced."""

    root: Path
    specs: tuple[PhotoSpec, ...]
    broken: tuple[str, ...]

    def summary(self) -> dict:
        degraded = sum(s.degradation is not None for s in self.specs)
        return {
            "root": str(self.root),
            "photos": len(self.specs),
            "degraded": degraded,
            "broken": len(self.broken),
        }


def write_photos(
    out_dir: str | os.PathLike,
    n: int = 240,
    *,
    seed: int = 0,
    base: int = 64,
    degraded_fraction: float = 0.3,
    broken: bool = True,
) -> SyntheticSet:
    """Write `n` PNG photos with `.json` sidecars (plus a few broken files) into `out_dir`.

    Idempotent: files already present with the right bytes are not rewritten, so re-running
    leaves mtimes alone and ingest sees nothing new. Nothing else is written into `out_dir`
    (ingest scans it); the specs are a pure function of `(seed, index)`.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    specs = tuple(photo_spec(i, seed=seed, base=base, degraded_fraction=degraded_fraction) for i in range(n))
    for spec in specs:
        _write_if_changed(root / f"{spec.name}.png", _png_bytes(render(spec, seed=seed)))
        _write_if_changed(root / f"{spec.name}.json", (json.dumps(sidecar(spec), indent=2) + "\n").encode())
    names: tuple[str, ...] = ()
    if broken:
        for name, data in _broken_payloads(seed, base).items():
            _write_if_changed(root / name, data)
        names = tuple(name for name, _ in BROKEN_FILES)
    return SyntheticSet(root, specs, names)


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    _atomic_write(path, data)


def sample_images(n: int, *, seed: int, base: int = 64, degraded_fraction: float = 0.0) -> list[Image.Image]:
    """In-memory photos (no sidecars), e.g. for VAE training and tests."""
    return [
        render(photo_spec(i, seed=seed, base=base, degraded_fraction=degraded_fraction), seed=seed)
        for i in range(n)
    ]


def combinations(
    colours: Sequence[str] = tuple(COLOURS), shapes: Sequence[str] = SHAPES
) -> list[tuple[str, str]]:
    """Every (colour, shape) pair, in a fixed order (the demo grid's rows)."""
    return [(c, s) for s in shapes for c in colours]


# --- The demo's photos: a hidden quality, for bigasp's own quality stage to find -------------------
#
# Each photo has a hidden quality q ~ U(0, 1) that only the simulated raters see. It sets how
# washed-out the photo is: every pixel is pulled toward mid-grey, keeping a share `contrast_of(q)`
# of its distance (q = 1: untouched; q = 0: MIN_CONTRAST of the contrast left), as a hazy, flat or
# badly exposed photo is. The sidecars carry no score: scores come from `bigasp quality`. Why
# contrast and not blur or noise: at 64 px an 8x VAE has an 8x8 latent, far coarser than a blur
# radius or a noise grain, so a tiny model cannot draw those on demand; contrast lives in the
# latent's colour channels, so a model can learn and express it (docs/demo.md).

MIN_CONTRAST = 0.2  # contrast kept at q = 0
MID_GREY = 128.0
LOW_QUALITY_BELOW = 0.4  # photos below this hidden quality (clearly washed out) are tagged low_quality


@dataclass(frozen=True)
class RatedPhotoSpec:
    """One demo photo: content, framing and its hidden quality."""

    index: int
    colour: str
    shape: str
    background: str
    width: int
    height: int
    cx: float
    cy: float
    size: float
    quality: float  # hidden: only the simulated raters see it

    @property
    def name(self) -> str:
        return f"{self.index:05d}_{self.colour}_{self.shape}"

    @property
    def contrast(self) -> float:
        return contrast_of(self.quality)


CONTRAST_MIDPOINT = 0.5  # hidden quality at which half the lost contrast is back
CONTRAST_WIDTH = 0.06  # logistic width: q < 0.35 keeps <= 27% of the contrast, q > 0.65 >= 93%


def contrast_of(quality: float) -> float:
    """Share of the photo's contrast kept at hidden quality `quality`: a steep logistic step from
    MIN_CONTRAST to 1, so most photos are clearly washed out or clearly crisp, as a photo
    collection is mostly fine with a tail of failed shots, and the few in between grade smoothly."""
    step = 1.0 / (1.0 + math.exp(-(quality - CONTRAST_MIDPOINT) / CONTRAST_WIDTH))
    return MIN_CONTRAST + (1.0 - MIN_CONTRAST) * step


def rated_spec(index: int, *, seed: int = 0, base: int = 64) -> RatedPhotoSpec:
    """Colour and shape cycle (balanced); the shape is large and near the centre so that an 8x8
    latent still holds its outline; aspect and area as `photo_spec` (the bucket fit only downscales)."""
    rng = np.random.default_rng([seed, index, 0xC0DE])
    colour = tuple(COLOURS)[index % len(COLOURS)]
    shape = SHAPES[(index // len(COLOURS)) % len(SHAPES)]
    background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    aspect = ASPECTS[int(rng.integers(len(ASPECTS)))]
    area = (base * float(rng.uniform(1.25, 1.6))) ** 2
    width = round(math.sqrt(area * aspect))
    height = round(math.sqrt(area / aspect))
    size = float(rng.uniform(0.6, 0.75))
    cx = float(rng.uniform(0.45, 0.55))
    cy = float(rng.uniform(0.45, 0.55))
    quality = float(rng.random())
    return RatedPhotoSpec(index, colour, shape, background, width, height, cx, cy, size, quality)


def washed_out(img: Image.Image, contrast: float) -> Image.Image:
    """Every pixel pulled toward mid-grey, keeping `contrast` of its distance (RMS contrast x `contrast`)."""
    arr = np.asarray(img, dtype=np.float32)
    out = MID_GREY + (arr - MID_GREY) * contrast
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def render_rated(spec: RatedPhotoSpec, *, seed: int = 0) -> Image.Image:
    """Draw the photo (deterministic): the clean shape, then washed out by its hidden quality."""
    rng = np.random.default_rng([seed, spec.index, 0xD1CE])
    jitter = rng.integers(-12, 13, size=3)
    bg = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(BACKGROUNDS[spec.background], jitter, strict=True))
    img = draw_shape(
        spec.width, spec.height, spec.shape, COLOURS[spec.colour], bg, cx=spec.cx, cy=spec.cy, size=spec.size
    )
    return washed_out(img, spec.contrast)


def rated_sidecar(spec: RatedPhotoSpec) -> dict:
    """Two captions and tags, as a captioner and a tagger would write them: a clearly washed-out
    photo is tagged `low_quality` (the tagger's word; training prompts built from tags carry it).
    The captions describe the content only. No score: bigasp's quality stage gives it one."""
    thing = f"{spec.colour} {spec.shape}"
    bg = f"{spec.background} background"
    forms = (
        f"A photo of a {thing} on a {bg}.",
        f"A {thing} centred on a plain {bg}, photograph.",
        f"This image shows a single {thing} against a {bg}.",
    )
    first = spec.index % len(forms)
    tags = [f"{spec.colour}_{spec.shape}", spec.shape, spec.colour, f"{spec.background}_background",
            "simple_background"]  # fmt: skip
    if spec.quality < LOW_QUALITY_BELOW:
        tags.append("low_quality")
    return {
        "captions": [forms[first], forms[(first + 1) % len(forms)]],
        "tags": tags,
        "source": "bigasp-demo",
        "watermark": False,
        "demo": {"colour": spec.colour, "shape": spec.shape},
    }


@dataclass(frozen=True)
class RatedSet:
    """What `write_rated_photos` produced."""

    root: Path
    specs: tuple[RatedPhotoSpec, ...]
    broken: tuple[str, ...]

    def summary(self) -> dict:
        return {
            "root": str(self.root),
            "photos": len(self.specs),
            "tagged_low_quality": sum(s.quality < LOW_QUALITY_BELOW for s in self.specs),
            "broken": len(self.broken),
        }

    def quality_by_name(self) -> dict[str, float]:
        return {f"{s.name}.png": s.quality for s in self.specs}


def rated_specs(n: int, *, seed: int = 0, base: int = 64) -> tuple[RatedPhotoSpec, ...]:
    return tuple(rated_spec(i, seed=seed, base=base) for i in range(n))


def write_rated_photos(
    out_dir: str | os.PathLike, n: int, *, seed: int = 0, base: int = 64, broken: bool = True
) -> RatedSet:
    """The demo's photos: `n` PNGs with sidecars (no scores) plus a few broken files, idempotently
    (files already right are not rewritten); only these files are written into `out_dir`."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    specs = rated_specs(n, seed=seed, base=base)
    for spec in specs:
        _write_if_changed(root / f"{spec.name}.png", _png_bytes(render_rated(spec, seed=seed)))
        _write_if_changed(
            root / f"{spec.name}.json", (json.dumps(rated_sidecar(spec), indent=2) + "\n").encode()
        )
    names: tuple[str, ...] = ()
    if broken:
        for name, data in _broken_payloads(seed, base).items():
            _write_if_changed(root / name, data)
        names = tuple(name for name, _ in BROKEN_FILES)
    return RatedSet(root, specs, names)
