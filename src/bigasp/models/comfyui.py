"""A ComfyUI workflow written beside a flow-model export, so the file runs correctly when dragged in.

A single SDXL file cannot tell ComfyUI (or A1111/Forge) that its UNet predicts rectified-flow
velocity: loaded as is it is sampled as eps and produces noise. The bigASP v2.5 card ships a
workflow image whose ModelSamplingSD3 node fixes that; bigasp writes the equivalent for every
flow export:

- `NAME.workflow.json`: the workflow in the UI format the ComfyUI canvas saves and loads
  (nodes with positions, sizes and `widgets_values`, links, schema version 0.4): drag it in;
- `NAME.workflow-api.json`: the same graph in ComfyUI's API ("prompt") format, for scripts that
  POST it to `/prompt`;
- `NAME.workflow.png`: a small image carrying both, as ComfyUI's SaveImage writes them: the API
  graph in its `prompt` text chunk and the UI graph in its `workflow` chunk (the one the canvas
  loads when an image is dragged in).

The UI graph is derived from the API graph (`ui_workflow`), never built separately, so the two
cannot disagree: same node ids, same titles, each link input a link, each other input a widget
value in the node's input order.

The graph: CheckpointLoaderSimple(NAME) -> [LoraLoader per LoRA] -> ModelSamplingSD3(shift from
the file's metadata) -> PerturbedAttentionGuidance -> KSampler, with CLIPTextEncode for both
prompts, EmptyLatentImage, VAEDecode and SaveImage. Sampler, scheduler, steps, CFG, PAG scale,
negative prompt and size are those `bigasp generate` uses for a flow model by default (the v2.5
card's), so ComfyUI and bigasp produce the same image for the same seed, up to float rounding.

`bigasp generate` and `watch` write the same two chunks into every PNG they save, built here from
that image's settings (`image_workflow`), so an image dragged onto ComfyUI loads as the graph
that reproduces it instead of ComfyUI's A1111 importer's guess.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from bigasp.fsutil import atomic_path, atomic_write_text
from bigasp.models.components import ModelKind

EXAMPLE_PROMPT = (
    "high quality photo of a red fox standing in fresh snow at the edge of a forest, soft morning light"
)


# What the UI format needs beyond the API graph, for the nodes bigasp writes: each node's outputs
# (name, type) in RETURN_TYPES order (names from RETURN_NAMES where ComfyUI sets them), and the
# INT widgets ComfyUI declares with `control_after_generate`, after which the canvas adds a combo
# widget whose value is stored in `widgets_values` right after the INT's (API graphs omit it).
OUTPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "CheckpointLoaderSimple": (("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")),
    "LoraLoader": (("MODEL", "MODEL"), ("CLIP", "CLIP")),
    "ModelSamplingSD3": (("MODEL", "MODEL"),),
    "PerturbedAttentionGuidance": (("MODEL", "MODEL"),),
    "CLIPTextEncode": (("CONDITIONING", "CONDITIONING"),),
    "EmptyLatentImage": (("LATENT", "LATENT"),),
    "KSampler": (("LATENT", "LATENT"),),
    "VAEDecode": (("IMAGE", "IMAGE"),),
    "SaveImage": (("images", "IMAGE"),),
}
CONTROL_AFTER_GENERATE = {"KSampler": "seed"}
SEED_CONTROL = "fixed"  # keep the workflow's seed (the canvas default, "randomize", would not)
# Canvas sizes (width, height) as ComfyUI draws these nodes; others get DEFAULT_SIZE.
SIZES = {
    "CheckpointLoaderSimple": (315, 98),
    "LoraLoader": (315, 126),
    "ModelSamplingSD3": (315, 58),
    "PerturbedAttentionGuidance": (315, 58),
    "CLIPTextEncode": (425, 180),
    "EmptyLatentImage": (315, 106),
    "KSampler": (315, 262),
    "VAEDecode": (210, 46),
    "SaveImage": (315, 270),
}
DEFAULT_SIZE = (315, 100)
# The canvas cuts a title that does not fit its node with an ellipsis ("ModelSamplingSD3 (flow
# model: requir…" in 315 px: 36 characters after the title's left padding, ~7.9 px each in the
# frontend's 14 px title font). A node is widened to TITLE_PAD + TITLE_CHAR_PX per character.
TITLE_CHAR_PX = 9
TITLE_PAD = 40
FLOW_TITLE = "ModelSamplingSD3 (required)"
UI_SCHEMA_VERSION = 0.4  # the ComfyUI frontend's workflow schema with links as arrays


class WorkflowPaths(NamedTuple):
    api: Path  # NAME.workflow-api.json
    ui: Path  # NAME.workflow.json
    png: Path  # NAME.workflow.png


def workflow_paths(export: str | os.PathLike) -> WorkflowPaths:
    """Where the workflow files for `export` go: beside it, named after it."""
    stem = Path(export).with_suffix("")
    return WorkflowPaths(
        *(
            stem.with_name(stem.name + ext)
            for ext in (".workflow-api.json", ".workflow.json", ".workflow.png")
        )
    )


class LoraNode(NamedTuple):
    """One LoraLoader: the file name as ComfyUI lists it (models/loras/) and its two strengths."""

    name: str
    strength_model: float
    strength_clip: float


def node_width(cls: str, title: str) -> int:
    """The node's canvas width: its usual width, wider where the title would be cut off."""
    return max(SIZES.get(cls, DEFAULT_SIZE)[0], TITLE_PAD + TITLE_CHAR_PX * len(title))


def api_workflow(
    ckpt_name: str,
    kind: ModelKind,
    settings: Any | None = None,
    prompt: str = EXAMPLE_PROMPT,
    loras: Sequence[LoraNode] = (),
    negative: str | None = None,
) -> dict[str, dict[str, Any]]:
    """The ComfyUI API-format graph for a checkpoint file named `ckpt_name` (as ComfyUI lists it).

    `settings` is a `GenerateSettings`; by default the preset `bigasp generate` picks for `kind`.
    A PAG scale of 0 leaves the PerturbedAttentionGuidance node out (the card's "bypass PAG").
    `loras` become LoraLoader nodes chained after the checkpoint, in order; `negative` overrides
    the settings' negative prompt text (the CLIPTextEncode spelling of it).
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
    for lora in loras:
        model = add(
            "LoraLoader",
            f"LoRA {Path(lora.name).stem}",
            model=model,
            clip=clip,
            lora_name=lora.name,
            strength_model=lora.strength_model,
            strength_clip=lora.strength_clip,
        )
        clip = [model[0], 1]
    if kind.prediction == "flow":
        model = add("ModelSamplingSD3", FLOW_TITLE, model=model, shift=kind.shift)
    if s.pag > 0:
        model = add("PerturbedAttentionGuidance", "PerturbedAttentionGuidance", model=model, scale=s.pag)
    positive = add("CLIPTextEncode", "Positive prompt", text=prompt, clip=clip)
    negative_text = s.negative if negative is None else negative
    negative = add("CLIPTextEncode", "Negative prompt", text=negative_text, clip=clip)
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


CHECKPOINT_SUFFIXES = (".safetensors", ".sft")


def checkpoint_name(source: str) -> str:
    """The file name ComfyUI lists for the model bigasp loaded from `source`.

    A single file keeps its name (it must sit directly in ComfyUI's models/checkpoints/ under
    that name); any other source (a diffusers folder, a training checkpoint's `model`/`ema`, a
    preset) is named as `bigasp model export SOURCE NAME.safetensors` would be exported by the
    user: after the folder, or the checkpoint folder for `model`/`ema`."""
    path = Path((source or "model").removeprefix("preset:"))
    if path.suffix in CHECKPOINT_SUFFIXES:
        return path.name
    if path.name in ("model", "ema") and path.parent.name:
        stem = path.parent.name + ("-ema" if path.name == "ema" else "")
    else:
        stem = path.name or "model"
    return f"{stem}.safetensors"


_COMFY_SPECIAL = ("(", ")", "\\")  # what ComfyUI's weight parser reads in a CLIPTextEncode text
EMBEDDING_PREFIX = "embedding:"


def comfy_text(text: str, syntax: str) -> tuple[str | None, str]:
    """`text` as ComfyUI's CLIPTextEncode must receive it to encode as bigasp did with `syntax`.

    Returns (text, "") or (None, reason) when ComfyUI has no plain node for it. comfy: as is
    (weights and `embedding:NAME` are ComfyUI's own syntax). none: parentheses escaped as
    `\\(`/`\\)` (ComfyUI's literal parentheses), unless the text names an embedding, which
    ComfyUI would load. a1111: only a text without weights, brackets, escapes, BREAK or
    embeddings, where the two syntaxes encode alike (A1111's mean-restoring emphasis has no
    ComfyUI node)."""
    if syntax == "comfy":
        return text, ""
    if syntax == "none":
        if EMBEDDING_PREFIX in text:
            return None, "a prompt with `embedding:` under --syntax none (ComfyUI would load the embedding)"
        return text.replace("(", "\\(").replace(")", "\\)"), ""
    if any(c in text for c in (*_COMFY_SPECIAL, "[", "]")) or "BREAK" in text or EMBEDDING_PREFIX in text:
        return None, "A1111 prompt syntax (weights, [ ], BREAK) has no ComfyUI core node"
    return text, ""


# Limits of the ComfyUI widgets bigasp's own ranges exceed (KSampler.cfg, ModelSamplingSD3.shift,
# EmptyLatentImage.width/height in nodes.py / nodes_model_advanced.py): ComfyUI refuses such a graph.
COMFY_CFG_MIN = 0.0
COMFY_SHIFT_MAX = 100.0
COMFY_SIDE_MIN = 16


def out_of_comfy_range(settings: Any, kind: ModelKind) -> str:
    """Why ComfyUI would refuse this image's graph ("" when it accepts it)."""
    if settings.cfg < COMFY_CFG_MIN:
        return f"CFG {settings.cfg:g} is below ComfyUI's KSampler minimum {COMFY_CFG_MIN:g}"
    if kind.prediction == "flow" and kind.shift > COMFY_SHIFT_MAX:
        return f"shift {kind.shift:g} is above ComfyUI's ModelSamplingSD3 maximum {COMFY_SHIFT_MAX:g}"
    if min(settings.width, settings.height) < COMFY_SIDE_MIN:
        return f"size {settings.width}x{settings.height} is below ComfyUI's minimum side {COMFY_SIDE_MIN}"
    return ""


def image_workflow(
    prompt: str,
    settings: Any,
    kind: ModelKind,
    source: str,
    loras: Sequence[LoraNode] = (),
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]] | str:
    """(API graph, UI graph) that make this image in ComfyUI, or the reason there is none.

    The caller has checked what needs the model (chunking, noise); this checks the prompt syntax.
    """
    text, why = comfy_text(prompt, settings.syntax)
    negative, why_neg = comfy_text(settings.negative, settings.syntax)
    if text is None or negative is None:
        return why or why_neg
    out_of_range = out_of_comfy_range(settings, kind)
    if out_of_range:
        return out_of_range
    graph = api_workflow(checkpoint_name(source), kind, settings, text, loras, negative=negative)
    return graph, ui_workflow(graph)


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


def ui_workflow(graph: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The canvas (UI) format of an API graph whose node ids are in dependency order.

    Node ids stay the same (as numbers). A node's `inputs` are its link inputs, in its input
    order; a link's target slot indexes that list. `widgets_values` are the other inputs in input
    order, with the `control_after_generate` value after a seed. Nodes are laid out left to right
    by their depth in the graph.
    """
    ids = [int(i) for i in graph]
    if ids != sorted(ids) or any(int(src) >= int(i) for i, n in graph.items() for src in _sources(n)):
        raise ValueError("API graph node ids must be increasing and every link must point backwards")
    links: list[list[Any]] = []
    outputs: dict[str, list[dict[str, Any]]] = {
        i: [
            {"name": name, "type": kind, "links": [], "slot_index": slot}
            for slot, (name, kind) in enumerate(OUTPUTS[n["class_type"]])
        ]
        for i, n in graph.items()
    }
    depth: dict[str, int] = {}
    nodes = []
    for order, (node_id, node) in enumerate(graph.items()):
        cls = node["class_type"]
        inputs, widgets = [], []
        for name, value in node["inputs"].items():
            if _is_link(value):
                src, slot = value
                out = outputs[src][slot]
                link_id = len(links) + 1
                links.append([link_id, int(src), slot, int(node_id), len(inputs), out["type"]])
                out["links"].append(link_id)
                inputs.append({"name": name, "type": out["type"], "link": link_id})
            else:
                widgets.append(value)
                if CONTROL_AFTER_GENERATE.get(cls) == name:
                    widgets.append(SEED_CONTROL)
        depth[node_id] = 1 + max((depth[src] for src in _sources(node)), default=-1)
        nodes.append(
            {
                "id": int(node_id),
                "type": cls,
                "title": node["_meta"]["title"],
                "pos": [0, 0],
                "size": [node_width(cls, node["_meta"]["title"]), SIZES.get(cls, DEFAULT_SIZE)[1]],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": inputs,
                "outputs": outputs[node_id],
                "properties": {"Node name for S&R": cls},
                "widgets_values": widgets,
            }
        )
    _lay_out(nodes, [depth[str(n["id"])] for n in nodes])
    return {
        "last_node_id": max(ids),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "version": UI_SCHEMA_VERSION,
    }


def _sources(node: dict[str, Any]) -> list[str]:
    return [v[0] for v in node["inputs"].values() if _is_link(v)]


def _lay_out(nodes: list[dict[str, Any]], depths: list[int], gap: int = 60) -> None:
    """Columns by depth, each node below the previous one of its column."""
    x = 40
    for col in range(max(depths) + 1):
        members = [n for n, d in zip(nodes, depths, strict=True) if d == col]
        y = 40
        for n in members:
            n["pos"] = [x, y]
            y += n["size"][1] + gap
        x += max(n["size"][0] for n in members) + gap


def _card_image(lines: list[str]) -> Any:
    """A small image that says what it carries (ComfyUI reads the workflow, not the pixels)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (640, 32 + 22 * len(lines)), (32, 34, 40))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((16, 16 + 22 * i), line, fill=(230, 230, 230))
    return img


def write_workflow(export: str | os.PathLike, kind: ModelKind, settings: Any | None = None) -> list[Path]:
    """Write the UI and API JSON and the workflow PNG beside `export`; returns their paths."""
    from PIL.PngImagePlugin import PngInfo

    export = Path(export)
    graph = api_workflow(export.name, kind, settings)
    ui = ui_workflow(graph)
    paths = workflow_paths(export)
    atomic_write_text(paths.api, json.dumps(graph, indent=2) + "\n", durable=False)
    atomic_write_text(paths.ui, json.dumps(ui, indent=2) + "\n", durable=False)
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
    info.add_text("prompt", json.dumps(graph))  # as ComfyUI's SaveImage: API graph in `prompt`,
    info.add_text("workflow", json.dumps(ui))  # the canvas graph in `workflow`
    with atomic_path(paths.png, durable=False) as tmp:
        _card_image(lines).save(tmp, format="PNG", pnginfo=info)
    return [paths.ui, paths.api, paths.png]
