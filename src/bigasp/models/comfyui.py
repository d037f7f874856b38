"""A ComfyUI workflow written beside a flow-model export, so the file runs correctly when dragged in.

A single SDXL file cannot tell ComfyUI (or A1111/Forge) that its UNet predicts rectified-flow
velocity: loaded as is it is sampled as eps and produces noise. The bigASP v2.5 card ships a
workflow image whose ModelSamplingSD3 node fixes that; bigasp writes the equivalent for every
flow export:

- `NAME.workflow-api.json`: the workflow in ComfyUI's API ("prompt") format; drop it on the
  ComfyUI canvas, or POST it to `/prompt`;
- `NAME.workflow.png`: a small image carrying the same JSON in its `prompt` text chunk, which is
  what ComfyUI's SaveImage writes and what its canvas reads when an image is dragged in.

The graph: CheckpointLoaderSimple(NAME) -> ModelSamplingSD3(shift from the file's metadata) ->
PerturbedAttentionGuidance -> KSampler, with CLIPTextEncode for both prompts, EmptyLatentImage,
VAEDecode and SaveImage. Sampler, scheduler, steps, CFG, PAG scale, negative prompt and size are
those `bigasp generate` uses for a flow model by default (the v2.5 card's), so ComfyUI and
bigasp produce the same image for the same seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bigasp.fsutil import atomic_path, atomic_write_text
from bigasp.models.components import ModelKind

EXAMPLE_PROMPT = (
    "high quality photo of a red fox standing in fresh snow at the edge of a forest, soft morning light"
)


def workflow_paths(export: str | os.PathLike) -> tuple[Path, Path]:
    """Where the API JSON and the PNG for `export` go: beside it, named after it."""
    export = Path(export)
    stem = export.with_suffix("")
    return stem.with_name(stem.name + ".workflow-api.json"), stem.with_name(stem.name + ".workflow.png")


def api_workflow(
    ckpt_name: str, kind: ModelKind, settings: Any | None = None, prompt: str = EXAMPLE_PROMPT
) -> dict[str, dict[str, Any]]:
    """The ComfyUI API-format graph for a checkpoint file named `ckpt_name` (as ComfyUI lists it).

    `settings` is a `GenerateSettings`; by default the preset `bigasp generate` picks for `kind`.
    A PAG scale of 0 leaves the PerturbedAttentionGuidance node out (the card's "bypass PAG").
    """
    from bigasp.sample.generate import GenerateSettings, preset_for

    s = settings or GenerateSettings.from_preset(preset_for(kind))
    nodes: dict[str, dict[str, Any]] = {}

    def add(class_type: str, title: str, **inputs: Any) -> list[Any]:
        node_id = str(len(nodes) + 1)
        nodes[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        return [node_id, 0]

    ckpt = add("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=ckpt_name)
    model, clip, vae = ckpt, [ckpt[0], 1], [ckpt[0], 2]
    if kind.prediction == "flow":
        model = add(
            "ModelSamplingSD3", "ModelSamplingSD3 (flow model: required)", model=model, shift=kind.shift
        )
    if s.pag > 0:
        model = add("PerturbedAttentionGuidance", "PerturbedAttentionGuidance", model=model, scale=s.pag)
    positive = add("CLIPTextEncode", "Positive prompt", text=prompt, clip=clip)
    negative = add("CLIPTextEncode", "Negative prompt", text=s.negative, clip=clip)
    latent = add("EmptyLatentImage", "Empty Latent Image", width=s.width, height=s.height, batch_size=s.batch)
    samples = add(
        "KSampler",
        "KSampler",
        model=model,
        seed=s.seed,
        steps=s.steps,
        cfg=s.cfg,
        sampler_name=s.sampler,
        scheduler=s.scheduler,
        positive=positive,
        negative=negative,
        latent_image=latent,
        denoise=1.0,
    )
    image = add("VAEDecode", "VAE Decode", samples=samples, vae=vae)
    add("SaveImage", "Save Image", images=image, filename_prefix=Path(ckpt_name).stem)
    return nodes


def _card_image(lines: list[str]) -> Any:
    """A small image that says what it carries (ComfyUI reads the workflow, not the pixels)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (640, 32 + 22 * len(lines)), (32, 34, 40))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((16, 16 + 22 * i), line, fill=(230, 230, 230))
    return img


def write_workflow(export: str | os.PathLike, kind: ModelKind, settings: Any | None = None) -> list[Path]:
    """Write the API JSON and the workflow PNG beside `export`; returns their paths."""
    from PIL.PngImagePlugin import PngInfo

    export = Path(export)
    graph = api_workflow(export.name, kind, settings)
    api_path, png_path = workflow_paths(export)
    atomic_write_text(api_path, json.dumps(graph, indent=2) + "\n", durable=False)
    sampler = next(n["inputs"] for n in graph.values() if n["class_type"] == "KSampler")
    lines = [
        f"ComfyUI workflow for {export.name}",
        f"{kind.prediction} model, ModelSamplingSD3 shift {kind.shift:g}"
        if kind.prediction == "flow"
        else f"{kind.prediction} model",
        f"{sampler['sampler_name']} / {sampler['scheduler']}, {sampler['steps']} steps, CFG {sampler['cfg']:g}",
        "Drag this image onto the ComfyUI canvas to load the workflow.",
    ]
    info = PngInfo()
    info.add_text("prompt", json.dumps(graph))
    with atomic_path(png_path, durable=False) as tmp:
        _card_image(lines).save(tmp, format="PNG", pnginfo=info)
    return [api_path, png_path]
