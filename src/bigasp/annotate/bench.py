"""`bigasp bench annotate`: images/s of each annotate stage and of the fused one-decode pass.

Generates N JPEGs (untimed), ingests them, builds the tiny models (`bigasp.annotate.tiny`),
then times `annotate()` runs (from the first loader batch to the last part written; model
loading excluded): each image stage alone (decode + preprocess + model), the
fused pass (embed + tags + watermark on one decode per image) and the caption pass (tiny
LLaVA, 16 new tokens). Every run writes fresh results under its own model key, so nothing
is skipped. On CPU with tiny models this measures the pipeline's own cost (decode, resize,
batching, Parquet parts), which is what bounds a GPU run's input side.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from bigasp.bench.common import BenchResult, machine_info


def _write_jpegs(root: Path, n: int, width: int, height: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (max(height // 16, 1), max(width // 16, 1), 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR).save(
            root / f"{i:05d}.jpg", quality=90
        )


def _decode_and_prepare(ds: Path, models: dict[str, Path]) -> tuple[float, dict[str, float]]:
    """Seconds to read + decode every image once (the cost the fused pass pays once, not three
    times), and each stage's worker-side input building, in ms per image."""
    import time

    from transformers import CLIPImageProcessorPil

    from bigasp.annotate.caption import CaptionPrepare
    from bigasp.annotate.decode import decode_image, manifest_jobs
    from bigasp.annotate.embed import EmbedPrepare
    from bigasp.annotate.tags import TagPrepare
    from bigasp.annotate.watermark import WatermarkPrepare
    from bigasp.store import layout
    from bigasp.store.manifest import read_manifest

    jobs = manifest_jobs(read_manifest(*layout.url_to_fs(str(ds))))
    t0 = time.perf_counter()
    decoded = [decode_image(job.ref.read(), job.orientation) for job in jobs[:8]]
    for job in jobs[8:]:
        decode_image(job.ref.read(), job.orientation)
    decode_s = time.perf_counter() - t0
    prepares = {
        "embed": EmbedPrepare(CLIPImageProcessorPil.from_pretrained(str(models["embed"]))),
        "tags": TagPrepare(448),
        "watermark": WatermarkPrepare(960),
        "caption": CaptionPrepare(384),
    }
    prep_ms = {}
    for name, prep in prepares.items():
        t0 = time.perf_counter()
        for im in decoded:
            prep(im)
        prep_ms[name] = 1000 * (time.perf_counter() - t0) / len(decoded)
    return decode_s, prep_ms


def run_annotate_bench(
    *, images: int, width: int, height: int, num_workers: int, seed: int, device: torch.device, command: str
) -> BenchResult:
    from bigasp.annotate import tiny
    from bigasp.annotate.config import AnnotateConfig
    from bigasp.annotate.run import annotate
    from bigasp.prep.config import IngestConfig
    from bigasp.prep.ingest import ingest

    with tempfile.TemporaryDirectory(prefix="bigasp-bench-annotate-") as tmp:
        t = Path(tmp)
        _write_jpegs(t / "src", images, width, height, seed)
        ingest([t / "src"], t / "ds", IngestConfig(allow_upscale=True, progress=False))
        models = {
            "embed": tiny.clip_vision(t / "m" / "clip", side=224),
            "tags": tiny.onnx_tagger(t / "m" / "joytag", kind="joytag", side=448),
            "watermark": tiny.owlv2(t / "m" / "owlv2", side=960, patch=48),
            "caption": tiny.llava(t / "m" / "llava", side=384, patch=32),
        }
        base = {"device": str(device), "num_workers": num_workers, "progress": False, "batch_size": 16,
                "watermark": {"batch_size": 2}}  # fmt: skip

        def timed(stages: list[str], tag: str, **extra) -> float:
            cfg = {**base, "stages": stages, **extra}
            for s in stages:
                cfg[s] = {**cfg.get(s, {}), "model": str(models[s]), "key": f"{tag}-{s}"}
            summary = annotate(t / "ds", AnnotateConfig(**cfg))
            seconds = sum(summary.pass_seconds.values())  # from the first batch on: no model loading
            done = min(summary.stages[s].done for s in stages)
            if done != images:
                raise RuntimeError(f"bench annotate: {stages} annotated {done} of {images} images")
            return images / seconds

        decode_s, prep_ms = _decode_and_prepare(t / "ds", models)
        rates = {s: timed([s], "alone") for s in ("embed", "tags", "watermark")}
        fused = timed(["embed", "tags", "watermark"], "fused")
        caption = timed(
            ["caption"], "caption", caption={"max_new_tokens": 16, "batch_size": 8, "dtype": "fp32"}
        )
    separate = 1.0 / sum(1.0 / r for r in rates.values())
    metrics = {
        "decode_img_s": images / decode_s,
        "embed_img_s": rates["embed"],
        "tags_img_s": rates["tags"],
        "watermark_img_s": rates["watermark"],
        "fused_img_s": fused,
        "separate_passes_img_s": separate,
        "fused_speedup": fused / separate,
        "caption_img_s": caption,
        **{f"{k}_prepare_ms": v for k, v in prep_ms.items()},
    }
    return BenchResult(
        bench="annotate",
        config={"images": images, "size": f"{width}x{height}", "num_workers": num_workers, "seed": seed,
                "models": "tiny: CLIP-ViT 224, JoyTag-layout ONNX 448, OWLv2 960/48, LLaVA 384/32 (16 new tokens)"},
        metrics=metrics,
        headline=[
            ("decode_img_s", "img/s decode only"),
            ("embed_img_s", "img/s embed"),
            ("tags_img_s", "img/s tags"),
            ("watermark_img_s", "img/s watermark"),
            ("fused_img_s", "img/s fused pass"),
            ("fused_speedup", "x vs 3 passes"),
            ("caption_img_s", "img/s caption"),
        ],
        command=command,
        machine=machine_info(device),
    )  # fmt: skip
