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
    "ModelSamplingSD3": (315, 58),
    "PerturbedAttentionGuidance": (315, 58),
    "CLIPTextEncode": (425, 180),
    "EmptyLatentImage": (315, 106),
    "KSampler": (315, 262),
    "VAEDecode": (210, 46),
    "SaveImage": (315, 270),
}
DEFAULT_SIZE = (315, 100)
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
                "size": list(SIZES.get(cls, DEFAULT_SIZE)),
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
