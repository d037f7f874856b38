"""Reading dataset images (files or tar members) upright, and bigASP's synthetic degradations."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from bigasp.prep.images import TRANSPOSE, to_rgb
from bigasp.prep.sources import Ref, manifest_ref

__all__ = ["Ref", "degrade", "manifest_ref", "open_image"]


def open_image(ref: Ref, orientation: int | None = 1, *, max_side: int | None = None) -> Image.Image:
    """Decode to RGB with the recorded EXIF orientation applied, optionally downscaled."""
    im = Image.open(io.BytesIO(ref.read()))
    if max_side is not None and im.format == "JPEG":
        im.draft("RGB", (max_side, max_side))
    im.load()
    if orientation and orientation in TRANSPOSE:
        im = im.transpose(TRANSPOSE[orientation])
    im = to_rgb(im)
    if max_side is not None and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return im


def degrade(
    image: Image.Image, gen: np.random.Generator, *, blur_radius=(3, 16), jpeg_quality=(20, 70)
) -> tuple[Image.Image, dict]:
    """bigASP's corruption (TrainClassifier.ipynb): with p = 0.5 a Gaussian blur of integer radius
    in `blur_radius`, else a JPEG re-encode at integer quality in `jpeg_quality` (both inclusive)."""
    if gen.random() < 0.5:
        radius = int(gen.integers(blur_radius[0], blur_radius[1] + 1))
        return image.filter(ImageFilter.GaussianBlur(radius=radius)), {"kind": "blur", "radius": radius}
    quality = int(gen.integers(jpeg_quality[0], jpeg_quality[1] + 1))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB"), {"kind": "jpeg", "quality": quality}


Embedder = Callable[[list[Image.Image]], np.ndarray]
