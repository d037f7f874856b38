"""`[annotate]` config: which stages run, on which local model folders, with bigASP's settings.

Defaults follow bigASP's scripts (bigasp-training: embed.py, tag-images.py,
watermark-tagger.py, caption-images.py): thresholds, query, batch sizes, prompt mix.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from bigasp.config import Section

STAGES = ("embed", "tags", "watermark", "caption")
Stage = Literal["embed", "tags", "watermark", "caption"]


class EmbedConfig(Section):
    """CLIP vision embedding: CLS of the last hidden state before post_layernorm, no projection."""

    model: str = Field(
        "",
        description="Local folder of a CLIP model or CLIP vision model (bigASP: openai/clip-vit-base-patch32) "
        "with its preprocessor_config.json; or builtin:image-stats, 64 image statistics (contrast, "
        "sharpness, noise, JPEG, colour) that stand in for CLIP where none is at hand (the demo).",
    )
    key: str = Field("", description="Results folder name; unset = the model folder's name.")
    batch_size: int = Field(128, gt=0, description="Images per forward pass (bigASP: 128).")
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Compute precision (bigASP: fp32 with TF32); stored as fp16 either way."
    )


class TagsConfig(Section):
    """An ONNX tagger: JoyTag (model.onnx + top_tags.txt) or a WD v3 tagger (+ selected_tags.csv)."""

    model: str = Field("", description="Local folder with model.onnx and top_tags.txt or selected_tags.csv.")
    key: str = Field("", description="Results folder name; unset = the model folder's name.")
    kind: Literal["auto", "joytag", "wd"] = Field(
        "auto", description="auto: joytag when top_tags.txt is present, wd when selected_tags.csv is."
    )
    threshold: float = Field(0.4, ge=0, le=1, description="JoyTag: keep tags with sigmoid > threshold.")
    general_threshold: float = Field(0.35, ge=0, le=1, description="WD: general tags (category 0).")
    character_threshold: float = Field(0.85, ge=0, le=1, description="WD: character tags (category 4).")
    activation: Literal["auto", "sigmoid", "none"] = Field(
        "auto",
        description="What turns the ONNX output into probabilities. auto: sigmoid for JoyTag (the model "
        "outputs logits; bigASP applied the sigmoid), none for WD (its graph ends in a sigmoid). Set none if "
        "a JoyTag export already ends in a sigmoid.",
    )
    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="onnxruntime provider; auto = CUDA when onnxruntime-gpu sees the device."
    )
    batch_size: int = Field(256, gt=0, description="Images per ONNX run (bigASP: 256).")


class WatermarkConfig(Section):
    """OWLv2 open-vocabulary detection with one text query, bigASP's way."""

    model: str = Field(
        "", description="Local Owlv2ForObjectDetection folder (bigASP: google/owlv2-base-patch16-ensemble)."
    )
    key: str = Field("", description="Results folder name; unset = the model folder's name.")
    query: str = Field("a watermark", description="Text query.")
    threshold: float = Field(0.1, ge=0, le=1, description="A box scoring above this flags the image.")
    batch_size: int = Field(8, gt=0, description="Images per forward pass (bigASP: 8).")
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Compute precision (bigASP: CUDA autocast)."
    )


class CaptionConfig(Section):
    """JoyCaption (a LLaVA checkpoint) with bigASP's prompt mix, one prompt per batch."""

    model: str = Field(
        "",
        description="Local LlavaForConditionalGeneration folder with tokenizer and chat template "
        "(v2: llama-joycaption-alpha-two-hf-llava; v2.5: llama-joycaption-beta-one-hf-llava).",
    )
    key: str = Field("", description="Results folder name; unset = the model folder's name.")
    prompt_set: str = Field(
        "alpha-two",
        description="Prompt set: alpha-two (bigASP v2), beta-one (for v2.5), or a path to a TOML file "
        "in the same form (see docs/annotate.md).",
    )
    max_new_tokens: int = Field(256, gt=0, description="Generation length limit (bigASP: 256).")
    do_sample: bool = Field(
        True, description="Sample (temperature/top-p from the model's generation config)."
    )
    batch_size: int = Field(
        32, gt=0, description="Images per generate call, all with one prompt (bigASP: 32)."
    )
    skip_score_zero: bool = Field(
        True, description="Caption only images whose score is not 0 (bigASP dropped score-0 images)."
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="Model precision (bigASP: bf16).")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="vllm: use vLLM when installed (GPU only)."
    )


class AnnotateConfig(Section):
    """How `bigasp annotate` runs; each stage runs when listed in `stages` (default: those with a model)."""

    stages: list[Stage] = Field(
        default_factory=list, description="Stages to run; empty = every stage whose model is set."
    )
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    tags: TagsConfig = Field(default_factory=TagsConfig)
    watermark: WatermarkConfig = Field(default_factory=WatermarkConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    device: str = Field(
        "auto",
        description="auto = cuda:LOCAL_RANK when CUDA is available, else cpu; cuda = cuda:LOCAL_RANK; cuda:N; cpu. "
        "A device this machine lacks is refused before any model loads.",
    )
    num_workers: int = Field(4, ge=0, description="DataLoader processes that decode images and build inputs.")
    batch_size: int = Field(64, gt=0, description="Images decoded per loader batch of the image pass.")
    part_size: int = Field(
        4096, gt=0, description="Results per part file; a kill loses at most this many per stage and rank."
    )
    seed: int = Field(0, description="Keys the caption order, prompts and sampling.")
    max_pixels: int = Field(933_120_000, gt=0, description="Decompression-bomb guard (bigASP's value).")
    draft: bool = Field(
        False,
        description="JPEG DCT-scaled decode to about twice the largest model input (faster on big photos; "
        "pixels then differ slightly from a full decode).",
    )
    retry_failed: bool = Field(False, description="Retry images recorded as failed by an earlier run.")
    limit_parts: int = Field(
        0,
        ge=0,
        description="Stop after writing this many parts per stage (0 = no limit); for tests and trials.",
    )
    progress: bool = Field(True, description="Progress bar.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for photos at URLs (a dataset ingested from s3://, gs://, https://), e.g. "
        "{endpoint_url = ..., key = ..., secret = ...}; empty = the usual AWS_* / GOOGLE_* variables; also "
        "used for a dataset at a URL.",
    )
    work_dir: str = Field(
        "",
        description="For a dataset at a URL: this machine's working copy (empty = ~/.cache/bigasp/datasets/<hash "
        "of the URL>, or $BIGASP_WORK_DIR/<hash>).",
    )


class MergeConfig(Section):
    """How `bigasp annotate merge` fills the manifest's annotation columns."""

    precedence: Literal["sidecar", "annotations"] = Field(
        "sidecar",
        description="Which value wins when an image has both a sidecar value and an annotation: sidecar "
        "(default; annotations fill only what sidecars left empty) or annotations.",
    )
    columns: list[Literal["tags", "captions", "score", "watermark"]] = Field(
        default_factory=lambda: ["tags", "captions", "score", "watermark"],
        description="Manifest columns to fill.",
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Model key per stage when a stage has results from several models, e.g. {tags = 'joytag'}.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for a dataset at a URL (s3://bucket/ds), e.g. {endpoint_url = ...}; empty = "
        "the usual AWS_* / GOOGLE_* variables.",
    )
    work_dir: str = Field(
        "",
        description="For a dataset at a URL: this machine's working copy (empty = ~/.cache/bigasp/datasets/<hash "
        "of the URL>, or $BIGASP_WORK_DIR/<hash>).",
    )
