"""One decode per image: DataLoader workers read, decode and build every model's input.

A worker turns one manifest row into a dict `{stage: input array}` for the stages that
still need that image, from a single decoded, upright, RGB copy of it. Each stage's input
builder (`prepare`) is a small picklable object defined in the stage's module, so the exact
preprocessing of every model lives next to the model and is tested there.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from bigasp.prep.images import TRANSPOSE, Reject, pixel_limit, to_rgb
from bigasp.prep.ingest import read_ingested
from bigasp.prep.sources import Ref, manifest_ref

JOB_COLUMNS = ("id", "path", "tar_offset", "file_size", "orientation", "row")


@dataclass(frozen=True)
class Job:
    id: str
    ref: Ref
    orientation: int
    stages: tuple[str, ...]  # the stages that still need this image


def manifest_jobs(manifest: pa.Table) -> list[Job]:
    """Every manifest row as a job (no stages yet), sorted by id: the order ranks shard."""
    if "row" not in manifest.column_names:  # a manifest table built before the column existed
        manifest = manifest.append_column("row", pa.nulls(len(manifest), pa.int64()))
    table = manifest.select(list(JOB_COLUMNS)).sort_by("id")
    cols = table.to_pydict()
    jobs = []
    for i in range(len(table)):
        path, off = cols["path"][i], cols["tar_offset"][i]
        ref = manifest_ref(path, off, cols["file_size"][i], cols["row"][i])
        jobs.append(Job(cols["id"][i], ref, cols["orientation"][i] or 1, ()))
    return jobs


def decode_image(data: bytes, orientation: int, *, draft_to: int = 0) -> Image.Image:
    """File bytes -> upright 8-bit RGB image. `draft_to` > 0 lets libjpeg decode at a reduced
    scale that keeps both sides at least that large (JPEG only)."""
    im = Image.open(io.BytesIO(data))
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    if draft_to and im.format == "JPEG":
        w, h = im.size
        s = draft_to / min(w, h)
        if s < 1:
            im.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))
    im.load()
    if orientation in TRANSPOSE:
        im = im.transpose(TRANSPOSE[orientation])
    return to_rgb(im)


class DecodeDataset:
    """index -> (index, {stage: input}, (width, height), reason, detail); inputs empty on failure."""

    def __init__(
        self,
        jobs: list[Job],
        prepares: dict[str, Callable[[Image.Image], np.ndarray]],
        *,
        max_pixels: int,
        draft_to: int = 0,
        check_id: bool = True,
    ):
        self.jobs = jobs
        self.prepares = prepares
        self.max_pixels = max_pixels
        self.draft_to = draft_to
        self.check_id = check_id

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        job = self.jobs[i]
        try:
            with pixel_limit(self.max_pixels):
                data = read_ingested(job.ref, job.id if self.check_id else None)
                try:
                    im = decode_image(data, job.orientation, draft_to=self.draft_to)
                except Exception as err:
                    raise Reject("decode_failed", f"{type(err).__name__}: {err}") from None
            inputs = {}
            for stage in job.stages:
                try:
                    inputs[stage] = self.prepares[stage](im)
                except Exception as err:
                    raise Reject("preprocess_failed", f"{stage}: {type(err).__name__}: {err}") from None
        except Reject as r:
            return i, {}, (0, 0), r.reason, r.detail
        return i, inputs, im.size, "", ""


@dataclass
class Batch:
    """A collated loader batch: per stage, the job indices and their stacked inputs."""

    inputs: dict[str, tuple[list[int], np.ndarray]]
    sizes: dict[int, tuple[int, int]]  # job index -> (width, height) after orientation
    failed: list[tuple[int, str, str]]  # (job index, reason, detail)
    count: int


def collate(items) -> Batch:
    per: dict[str, tuple[list[int], list[np.ndarray]]] = {}
    sizes, failed = {}, []
    for i, inputs, size, reason, detail in items:
        if reason:
            failed.append((i, reason, detail))
            continue
        sizes[i] = size
        for stage, arr in inputs.items():
            idx, arrs = per.setdefault(stage, ([], []))
            idx.append(i)
            arrs.append(arr)
    stacked = {s: (idx, np.stack(arrs)) for s, (idx, arrs) in per.items()}
    return Batch(stacked, sizes, failed, len(items))


def pad_square(im: Image.Image, fill: tuple[int, int, int], *, center: bool) -> Image.Image:
    """The image on a max(w, h) square of `fill`: centred (JoyTag, WD) or at (0, 0) (OWLv2)."""
    w, h = im.size
    side = max(w, h)
    if w == h:
        return im
    out = Image.new("RGB", (side, side), fill)
    out.paste(im, ((side - w) // 2, (side - h) // 2) if center else (0, 0))
    return out
