"""`[ingest]` and `[encode]` config sections. Defaults follow bigASP v2's published recipe."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from bigasp.buckets import BucketConfig
from bigasp.config import Section

PILLOW_HARD_LIMIT = 178_956_970  # Pillow refuses above 2 x its default MAX_IMAGE_PIXELS
MAX_PIXELS_CEILING = 100_000_000_000  # 100 gigapixels: anything above is a typo, not a photo
MAX_WORKERS = 512


class IngestConfig(Section):
    """How `bigasp ingest` scans sources and what it rejects."""

    buckets: BucketConfig | None = Field(
        None,
        description="Bucket rule, used to reject images too small for their bucket and recorded in "
        "dataset.json for `bigasp encode`. Unset = the rule already recorded in the dataset, or the SDXL "
        "default for a new dataset.",
    )
    allow_upscale: bool = Field(
        False, description="Keep images smaller than their bucket (they will be upscaled at encode time)."
    )
    max_pixels: int = Field(
        PILLOW_HARD_LIMIT,
        ge=1,
        le=MAX_PIXELS_CEILING,
        description="Decompression-bomb guard: images with more pixels (width*height) are rejected as "
        "too_large. bigASP used 933,120,000. At most 100 gigapixels.",
    )
    max_file_size: int = Field(
        2 << 30,
        ge=1,
        description="Files larger than this many bytes are rejected as too_large without being read "
        "(default 2 GiB). Ingest streams files, but encode decodes each image whole in memory.",
    )
    animated: Literal["reject", "first_frame"] = Field(
        "reject", description="Animated GIF/WebP/APNG: reject, or keep and train on the first frame."
    )
    verify: Literal["header", "decode"] = Field(
        "header",
        description="header: read the header and check the end-of-file marker (JPEG EOI, PNG IEND, WebP "
        "RIFF length) — fast; decode: fully decode every image — slow, also catches corrupt scan data.",
    )
    commit_every: int = Field(
        1000, gt=0, description="Rows per committed part; a crash loses at most this many images' work."
    )
    workers: int = Field(
        1,
        ge=1,
        le=MAX_WORKERS,
        description="Processes that read and probe files (1 = in-process; at most 512).",
    )
    prune: bool = Field(
        True,
        description="Remove from the dataset the images (and rejects) that were found through one of this "
        "run's sources before but are gone now. Paths found through other sources are never touched.",
    )
    retry_rejects: bool = Field(
        False,
        description="Examine again every earlier reject of the scanned sources, even if neither the file, its "
        "sidecars nor the settings its reason depends on changed.",
    )
    txt_tags: Literal["caption", "tags", "auto"] = Field(
        "caption",
        description="How `name.txt` sidecars are read: caption; tags (a comma-separated tag list, as "
        "kohya's WD14 tagger writes); auto = tags when the text is one line of at least 3 comma-separated "
        "items of at most 4 words and 48 characters each with no sentence ending (. ! ?), else a caption.",
    )
    kohya_repeats: Literal["auto", "on", "off"] = Field(
        "auto",
        description="kohya `N_name` subfolders of a source folder: the image's source = name (unless a "
        "sidecar sets one) and `repeats` = N in `extra`. auto = when every subfolder of the source folder "
        "is named N_name; on = for every N_name subfolder; off = never.",
    )
    parquet_image_column: str = Field(
        "",
        description="Parquet sources: the column holding the image bytes (binary, or a struct with a `bytes` "
        "field as Hugging Face writes). Empty = the one such column (`image`, `jpg`, `png`, ... first when "
        "several qualify).",
    )
    parquet_columns: dict[str, str] = Field(
        default_factory=dict,
        description='Parquet sources: rename columns to sidecar keys, e.g. {text = "caption"}. Every other '
        "column of a row is read like a key of `name.json`: caption, captions, tags, score, source and "
        "watermark are interpreted, the rest kept in `extra`.",
    )
    checksums: Literal["auto", "verify", "off"] = Field(
        "auto",
        description="A `sha256` in a sidecar or column is compared with the image's bytes; a mismatch is a "
        "checksum_mismatch reject. auto: except img2dataset's records, whose sha256 is of the downloaded "
        "file, which img2dataset re-encodes or resizes unless told not to; verify: every sha256; off: none.",
    )
    progress: bool = Field(True, description="Show a progress bar with images/s.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for sources at URLs (s3://, gs://, https://), e.g. {endpoint_url = ..., "
        "key = ..., secret = ...}; empty = credentials from the usual AWS_* / GOOGLE_* variables. Never "
        "written to dataset.json.",
    )
    work_dir: str = Field(
        "",
        description="With --out at a URL (s3://bucket/ds): this machine's working copy of the dataset, where "
        "ingest runs before it writes the tables to the URL; empty = ~/.cache/bigasp/datasets/<hash of the "
        "URL> ($BIGASP_WORK_DIR instead of ~/.cache/bigasp/datasets when set). Never written to dataset.json.",
    )
    prefetch: int = Field(
        2,
        ge=0,
        le=64,
        description="Ranged requests in flight ahead of the reader while a tar shard at a URL is read (0 = "
        "fetch on demand).",
    )

    @field_validator("parquet_columns")
    @classmethod
    def _one_column_per_key(cls, v: dict[str, str]) -> dict[str, str]:
        keys: dict[str, str] = {}
        for col, key in v.items():
            if not key:
                raise ValueError(
                    f"column {col!r} is mapped to an empty key; give the sidecar key it stands for"
                )
            if key in keys:
                raise ValueError(
                    f"both {keys[key]!r} and {col!r} are mapped to {key!r}; map one column per key"
                )
            keys[key] = col
        return v


class EncodeConfig(Section):
    """How `bigasp encode` turns manifest rows into fp16 latents."""

    vae: str = Field(
        "",
        description="VAE: a preset name (tiny, sdxl-base), a diffusers AutoencoderKL folder (config.json + "
        "safetensors), or a full model (diffusers folder or single-file .safetensors).",
    )
    buckets: BucketConfig | None = Field(
        None, description="Bucket rule; unset = the rule recorded in dataset.json at ingest."
    )
    seed: int = Field(
        0, description="Keys the random crop and the latent sample of every image (with its id)."
    )
    latent: Literal["sample", "mean"] = Field(
        "sample", description="sample: latent_dist.sample() as bigASP; mean: the distribution mean."
    )
    scaling_factor: float | None = Field(
        None, description="Multiplier applied to stored latents; unset = the VAE config's scaling_factor."
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="VAE compute precision. fp32 default: the SDXL VAE overflows in fp16."
    )
    device: str = Field(
        "auto",
        description="auto = cuda:LOCAL_RANK when CUDA is available, else cpu; cuda = cuda:LOCAL_RANK; cuda:N; cpu. "
        "A device this machine lacks is refused before any model loads.",
    )
    batch_size: int = Field(16, gt=0, description="Images per VAE batch (all from one bucket).")
    num_workers: int = Field(4, ge=0, description="DataLoader processes decoding and resizing images.")
    shard_size: int = Field(2048, gt=0, description="Latents per shard file (one bucket per shard).")
    compression: Literal["none", "zstd"] = Field(
        "none", description="Per-record compression of stored latents (see docs/PERFORMANCE.md)."
    )
    zstd_level: int = Field(3, ge=1, le=22, description="zstd level when compression = zstd.")
    variants: int = Field(
        1,
        ge=1,
        description="Latents stored per image: each another keyed random crop and VAE sample; training "
        "cycles through them, one per epoch. Re-running encode with a larger number adds the missing ones.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options when the dataset is an object-storage URL (s3://...), e.g. "
        "{endpoint_url = ..., key = ..., secret = ...}; empty = credentials from the usual AWS_* variables.",
    )
    draft_margin: float = Field(
        1.0,
        ge=0,
        description="JPEG draft mode: let libjpeg decode at 1/2, 1/4 or 1/8 scale while the result stays at "
        "least draft_margin x the resize target (so it only acts when downscaling >= 2x). 0 disables.",
    )
    max_pixels: int = Field(PILLOW_HARD_LIMIT, description="Same decompression-bomb guard as ingest.")
    progress: bool = Field(True, description="Show a progress bar with images/s.")
    retry_rejects: bool = Field(
        False, description="Encode again images an earlier encode rejected (e.g. non_finite under fp16)."
    )
