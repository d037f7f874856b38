"""Reader for bigASP's original per-image latent files (`vaes/ab/cd/<md5>.bin.gz`).

Format (bigASP v2 `encode-vaes-buckets.py`): the whole file is gzip; inside, a 24-byte
little-endian `<IIIIII` header — original width, original height, crop x, crop y, then the
latent's H/8 and W/8 (the code names these "latent_width, latent_height", but writes
`latent.shape[1], latent.shape[2]`, i.e. height first) — followed by the raw fp16 bytes of
the C-contiguous (4, H/8, W/8) latent, already multiplied by the VAE scaling factor.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigasp.errors import DataError

HEADER = struct.Struct("<IIIIII")


@dataclass
class LegacyLatent:
    latent: np.ndarray  # float16 [4, H/8, W/8]
    original_height: int
    original_width: int
    crop_top: int
    crop_left: int

    @property
    def bucket_height(self) -> int:
        return self.latent.shape[1] * 8

    @property
    def bucket_width(self) -> int:
        return self.latent.shape[2] * 8


def parse_bigasp_latent(data: bytes, where: str = "<bytes>", channels: int = 4) -> LegacyLatent:
    """Decode the gunzipped bytes of one bigASP latent file."""
    if len(data) < HEADER.size:
        raise DataError(f"{where}: {len(data)} bytes is shorter than the 24-byte bigASP header")
    ow, oh, cx, cy, lh, lw = HEADER.unpack_from(data)
    body = data[HEADER.size :]
    expected = channels * lh * lw * 2
    if len(body) != expected:
        raise DataError(
            f"{where}: body has {len(body)} bytes but the header says a {channels}x{lh}x{lw} fp16 latent "
            f"({expected} bytes); the file is truncated or not a bigASP v2 latent (v1 files have a 28-byte header)"
        )
    latent = np.frombuffer(body, dtype=np.float16).reshape(channels, lh, lw).copy()
    return LegacyLatent(latent, original_height=oh, original_width=ow, crop_top=cy, crop_left=cx)


def read_bigasp_latent(path: str | os.PathLike) -> LegacyLatent:
    """Read one `.bin.gz` file written by bigASP's encoder."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip file ({err})") from None
    return parse_bigasp_latent(data, str(path))


def write_bigasp_latent(path: str | os.PathLike, item: LegacyLatent) -> None:
    """Write the bigASP layout (used to export, and to test the reader against the spec)."""
    lat = np.ascontiguousarray(item.latent, dtype=np.float16)
    head = HEADER.pack(
        item.original_width, item.original_height, item.crop_left, item.crop_top, lat.shape[1], lat.shape[2]
    )
    with gzip.open(path, "wb") as f:
        f.write(head + lat.tobytes())
