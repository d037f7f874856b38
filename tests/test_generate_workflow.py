"""Every PNG `bigasp generate` and `watch` write carries ComfyUI's `prompt` (API graph) and `workflow`
(canvas graph) text chunks with that image's own settings, built by the graph code of `model export`,
so that dropping the PNG on ComfyUI loads the graph that makes it (not the A1111 importer's guess).

The chunks are checked with the validators of tests/test_exports.py: ComfyUI's recorded node
definitions and the ComfyUI frontend's workflow schema.
"""

from __future__ import annotations

import json
import logging
import subprocess

import pytest
import torch
from PIL import Image

from bigasp.models import ModelKind, build_preset
from bigasp.sample import GenerateSettings, Generator
from lora_helpers import write_kohya
from test_exports import BIGASP, ENV, api_from_ui, validate_comfy_api, validate_comfy_ui
from test_watch import make_checkpoint

pytest.importorskip("peft")


def _chunks(png) -> tuple[dict, dict, dict]:
    with Image.open(png) as im:
        text = dict(im.text)
    return json.loads(text["prompt"]), json.loads(text["workflow"]), text


def _nodes(graph: dict, cls: str) -> list[dict]:
    return [n["inputs"] for n in graph.values() if n["class_type"] == cls]


def test_cli_generate_png_carries_its_own_comfyui_graph(tmp_path):
    """Seed, steps, cfg, sampler, scheduler, shift, PAG, size, both prompts and the LoRA with its two
    strengths, in both chunks, through the installed `bigasp` command."""
    lora = tmp_path / "style.safetensors"
    write_kohya(lora, build_preset("tiny", seed=0), 1, alpha=1.0)
    prompt = "a (red:1.2) fox in snow"
    cmd = [str(BIGASP), "generate", prompt, "--model", "tiny", "--prediction", "flow", "--shift", "2.5",
           "--size", "64x128", "--steps", "3", "--seed", "1234567", "--cfg", "2.5", "--pag", "1.5",
           "--sampler", "dpmpp_2m", "--scheduler", "karras", "--negative", "blurry, low quality",
           "--lora", f"{lora}:0.8:0.3", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "out")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr
    (png,) = (tmp_path / "out").glob("*.png")
    graph, ui, text = _chunks(png)
    files = {"checkpoints": ["tiny.safetensors"], "loras": ["style.safetensors"]}
    validate_comfy_api(graph, files)
    validate_comfy_ui(ui, files)
    assert api_from_ui(ui) == graph  # the canvas graph is the API graph
    (ks,) = _nodes(graph, "KSampler")
    assert (ks["seed"], ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"], ks["denoise"]) == (
        1234567, 3, 2.5, "dpmpp_2m", "karras", 1.0
    )  # fmt: skip
    (lora_id,) = [i for i, n in graph.items() if n["class_type"] == "LoraLoader"]
    assert _nodes(graph, "ModelSamplingSD3") == [{"model": [lora_id, 0], "shift": 2.5}]
    assert [n["scale"] for n in _nodes(graph, "PerturbedAttentionGuidance")] == [1.5]
    assert _nodes(graph, "EmptyLatentImage")[0] == {"width": 64, "height": 128, "batch_size": 1}
    assert graph[ks["positive"][0]]["inputs"]["text"] == prompt
    assert graph[ks["negative"][0]]["inputs"]["text"] == "blurry, low quality"
    (lo,) = _nodes(graph, "LoraLoader")
    assert (lo["lora_name"], lo["strength_model"], lo["strength_clip"]) == ("style.safetensors", 0.8, 0.3)
    # both prompts encode with the LoRA's CLIP
    assert (
        graph[ks["positive"][0]]["inputs"]["clip"]
        == graph[ks["negative"][0]]["inputs"]["clip"]
        == [lora_id, 1]
    )
    (seed_node,) = [n for n in ui["nodes"] if n["type"] == "KSampler"]
    assert seed_node["widgets_values"][:2] == [1234567, "fixed"]  # not re-rolled on load
    # the A1111 text and bigasp's own record keep both LoRA strengths too
    assert 'LoRA: "style: 0.8:0.3"' in text["parameters"]
    meta = json.loads(text["bigasp"])
    assert meta["model"]["loras"] == [{"file": str(lora), "weight": 0.8, "weight_clip": 0.3}]


@pytest.fixture(scope="module")
def gen():
    return Generator(build_preset("tiny", seed=0, kind=ModelKind("flow", 1.0)), "cpu", torch.float32)


def test_syntax_none_escapes_parentheses_for_comfyui(gen):
    s = GenerateSettings.from_preset("bigasp-v2.5", syntax="none", negative="bad (art)")
    graph = json.loads(gen.comfy_workflow("a (literal) cat", s, ModelKind("flow", 1.0))["prompt"])
    texts = {n["_meta"]["title"]: n["inputs"]["text"] for n in graph.values() if "text" in n["inputs"]}
    assert texts == {"Positive prompt": "a \\(literal\\) cat", "Negative prompt": "bad \\(art\\)"}


@pytest.mark.parametrize(
    ("prompt", "overrides", "reason"),
    [
        ("a (red:1.3) cat", {"syntax": "a1111"}, "A1111 prompt syntax"),
        ("a cat", {"sampler": "dpmpp_2m_sde", "noise": "iid"}, "--noise iid"),
        ("cat, " * 37 + "(big red hat:1.3) dog", {"chunking": "bigasp"}, "--chunking bigasp"),
        ("a embedding:x cat", {"syntax": "none"}, "--syntax none"),
        ("a cat", {"cfg": -1.0}, "below ComfyUI's KSampler minimum"),
        ("a cat", {"shift": 150.0}, "above ComfyUI's ModelSamplingSD3 maximum"),
        ("a cat", {"width": 8}, "below ComfyUI's minimum side"),
    ],
)
def test_settings_comfyui_cannot_reproduce_leave_the_chunks_out_with_a_warning(
    gen, caplog, prompt, overrides, reason
):
    s = GenerateSettings.from_preset("bigasp-v2.5", **overrides)
    kind = ModelKind("flow", s.shift or 1.0)
    with caplog.at_level(logging.WARNING):
        assert gen.comfy_workflow(prompt, s, kind) == {}
    assert "no ComfyUI workflow written into the PNG" in caplog.text and reason in caplog.text


def test_plain_a1111_and_bigasp_chunking_prompts_keep_their_chunks(gen):
    for overrides in ({"syntax": "a1111"}, {"chunking": "bigasp"}):
        s = GenerateSettings.from_preset("bigasp-v2.5", **overrides)
        assert set(gen.comfy_workflow("a cat in snow", s, ModelKind("flow", 1.0))) == {"prompt", "workflow"}


def test_cli_watch_pngs_carry_the_graph_of_their_checkpoint(tmp_path):
    """`bigasp watch --lora FILE:W_MODEL:W_CLIP`, through the installed command."""
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoints", 100, model=build_preset("tiny", seed=0, kind=ModelKind("flow", 3.0)))
    lora = tmp_path / "k.safetensors"
    write_kohya(lora, build_preset("tiny", seed=0), 1, alpha=1.0)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    cmd = [str(BIGASP), "watch", str(run), "--prompts", str(tmp_path / "prompts.txt"), "--seeds", "5",
           "--once", "--size", "64x64", "--steps", "2", "--device", "cpu", "--no-progress",
           "--lora", f"{lora}:0.5:1"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr
    folder = run / "samples" / "step-000000000100"
    graph, ui, _ = _chunks(folder / "p000-seed5.png")
    files = {"checkpoints": ["step-000000000100.safetensors"], "loras": ["k.safetensors"]}
    validate_comfy_api(graph, files)
    validate_comfy_ui(ui, files)
    assert _nodes(graph, "KSampler")[0]["seed"] == 5
    assert _nodes(graph, "ModelSamplingSD3")[0]["shift"] == 3.0
    assert [(n["strength_model"], n["strength_clip"]) for n in _nodes(graph, "LoraLoader")] == [(0.5, 1.0)]
    record = [{"file": str(lora), "weight": 0.5, "weight_clip": 1.0}]
    assert json.loads((folder / "done.json").read_text())["loras"] == record
    assert "LoRA k: 0.5:1" in (run / "samples" / "index.html").read_text()
