"""Image probing (header only) and decoding to a bucket crop.

Probing must be fast — ingest looks at millions of files — so it never decodes pixels: Pillow
parses the header lazily, EXIF orientation comes from the APP1/eXIf header data, and
truncation is detected from the file's end marker. Decoding happens once, at encode time,
and goes straight from the file bytes to the bucket crop: JPEG draft (DCT scaling) when the
image is much larger than needed, the recorded EXIF transpose, mode conversion to RGB,
Lanczos resize, crop.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from bigasp.buckets import Placement


def _openable_extensions() -> frozenset[str]:
    """Extensions of formats this Pillow build can open (plugins such as HEIF add theirs)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


# EXIF orientation -> the Pillow transpose that makes the image upright (as ImageOps.exif_transpose).
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class Reject(Exception):
    """An input we skip, with a stable machine-readable reason and a human detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Probe:
    format: str
    mode: str
    width: int  # after EXIF orientation
    height: int
    orientation: int


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make Pillow's bomb check follow our limit for the duration; we reject above it ourselves."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Pillow warns about damaged metadata it skips; the file's fate is decided here instead
            warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def orientation_of(im: Image.Image) -> int:
    """EXIF orientation from header data only (PNG getexif() would decode the whole image)."""
    try:
        if im.format == "PNG":
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = im.getexif()
        value = int(exif.get(0x0112, 1))
    except Exception:  # malformed EXIF: treat as upright rather than drop the photo
        return 1
    return value if value in TRANSPOSE else 1


def _find(f: BinaryIO, needle: bytes, start: int) -> bool:
    """Whether `needle` occurs at or after byte `start` of `f`, reading in 1 MiB chunks."""
    f.seek(start)
    tail = b""
    while chunk := f.read(1 << 20):
        if needle in tail + chunk:
            return True
        tail = chunk[-(len(needle) - 1) :]
    return False


def _truncated(f: BinaryIO, size: int, im: Image.Image) -> bool:
    """End-of-data marker checks that need no decoding (streamed: never the whole file in memory)."""
    fmt = im.format
    start = im.tile[0][2] if im.tile else 0
    if fmt in ("JPEG", "MPO"):
        # 0xFFD9 cannot occur inside entropy-coded data (0xFF is byte-stuffed), so searching
        # from the first scan skips EXIF thumbnails and tolerates trailers (motion photos).
        if isinstance(f, io.BytesIO):
            return f.getvalue().find(b"\xff\xd9", start) < 0  # in memory: one C-level search
        return not _find(f, b"\xff\xd9", start)
    if fmt == "PNG":
        lo = max(start, size - 64)
        f.seek(lo)
        return b"IEND" not in f.read(size - lo + 4)
    if fmt == "WEBP":
        f.seek(0)
        head = f.read(8)
        if head[:4] == b"RIFF" and len(head) == 8:
            return struct.unpack_from("<I", head, 4)[0] + 8 > size
    return False


def probe(
    data: bytes | BinaryIO,
    *,
    name: str,
    max_pixels: int,
    animated: str,
    verify: str,
    size: int | None = None,
) -> Probe:
    """Header facts of one image, or `Reject`. Must be called inside `pixel_limit`.

    `data` is the file's bytes or a seekable binary stream of `size` bytes (ingest streams, so
    a multi-GB file is never read whole into memory).
    """
    f: BinaryIO = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    if size is None:
        size = f.seek(0, 2)
    f.seek(0)
    if not size:
        raise Reject("empty", "zero-byte file")
    try:
        return _probe(f, size, name=name, max_pixels=max_pixels, animated=animated, verify=verify)
    except Reject:
        raise
    except Image.DecompressionBombError as err:
        m = re.search(r"\((\d+) pixels\)", str(err))
        fix = f" (--max-pixels {m.group(1)} keeps it)" if m else ""
        raise Reject("too_large", f"{err}{fix}") from None
    except (MemoryError, RecursionError) as err:
        raise Reject("corrupt", f"{type(err).__name__} while reading the header") from None
    except Exception as err:  # malformed data raises many exception types from Pillow's plugins
        raise Reject("corrupt", f"{type(err).__name__}: {err}") from None


def _probe(f: BinaryIO, size: int, *, name: str, max_pixels: int, animated: str, verify: str) -> Probe:
    try:
        im = Image.open(f)
    except UnidentifiedImageError:
        ext = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if ext in _openable_extensions():
            raise Reject("corrupt", "Pillow cannot identify the image data") from None
        raise Reject(
            "unsupported_format", f"not an image format Pillow can open ({ext or 'no extension'})"
        ) from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise Reject("corrupt", f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise Reject(
            "too_large",
            f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels} (--max-pixels {w * h} keeps it)",
        )
    is_anim = bool(getattr(im, "is_animated", False)) and im.format != "MPO"  # MPO: camera multi-picture
    if is_anim and animated == "reject":
        raise Reject(
            "animated",
            f"{im.format} with {getattr(im, 'n_frames', '>1')} frames (--animated first_frame keeps frame 0)",
        )
    if is_anim:
        im.seek(0)
    if verify == "decode":
        try:
            im.load()
        except Exception as err:
            reason = "truncated" if "truncated" in str(err) else "corrupt"
            raise Reject(reason, f"decode failed: {err}") from None
    elif _truncated(f, size, im):
        raise Reject("truncated", f"{im.format} data ends before its end marker")
    orient = orientation_of(im)
    if orient in (5, 6, 7, 8):
        w, h = h, w
    return Probe(format=im.format or "unknown", mode=im.mode, width=w, height=h, orientation=orient)


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited onto `background` (white)."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode != "F":
            arr = arr / 257.0  # 16-bit range to 8-bit (I holds 16-bit PNG data)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("P", "PA", "L", "RGB", "1") and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def load_for_bucket(
    data: bytes, placement: Placement, *, orientation: int, draft_margin: float = 1.0
) -> np.ndarray:
    """Decode once and return the bucket crop as uint8 [H, W, 3] (height, width of the bucket)."""
    p = placement
    im = Image.open(io.BytesIO(data))
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    if im.format == "JPEG" and draft_margin > 0:
        tw, th = p.resized_width, p.resized_height
        if orientation in (5, 6, 7, 8):
            tw, th = th, tw  # draft works on the stored (pre-rotation) image
        im.draft("RGB", (math.ceil(tw * draft_margin), math.ceil(th * draft_margin)))
    im.load()
    if orientation in TRANSPOSE:
        im = im.transpose(TRANSPOSE[orientation])
    im = to_rgb(im)
    size = (p.resized_width, p.resized_height)
    if im.size != size:
        im = im.resize(size, Image.Resampling.LANCZOS)
    bh, bw = p.bucket.height, p.bucket.width
    im = im.crop((p.crop_left, p.crop_top, p.crop_left + bw, p.crop_top + bh))
    arr = np.asarray(im, dtype=np.uint8)
    if arr.shape != (bh, bw, 3):
        raise Reject("decode_failed", f"crop has shape {arr.shape}, expected {(bh, bw, 3)}")
    return arr


__all__ = ["Probe", "Reject", "load_for_bucket", "orientation_of", "pixel_limit", "probe", "to_rgb"]
