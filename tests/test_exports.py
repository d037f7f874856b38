"""Exports people can use: `model export --dtype`, header-only `model info`, the ComfyUI workflow of a flow export.

The workflow is validated against ComfyUI's own node definitions (class names, required inputs with
their types and order, widget ranges and choices, output types), recorded from ComfyUI's source in
tests/data/comfyui_nodes.json; its canvas (UI) form also against the ComfyUI frontend's workflow
schema, recorded with the frontend's own default workflow in tests/data/comfyui_workflow_schema.json.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jsonschema import Draft202012Validator, ValidationError
from PIL import Image
from safetensors import SafetensorError, safe_open
from typer.testing import CliRunner

from bigasp.cli import app
from bigasp.errors import ModelLoadError
from bigasp.models.comfyui import LoraNode, api_workflow, ui_workflow, workflow_paths
from bigasp.models.components import ModelKind
from bigasp.models.file_header import read_header, single_file_info
from bigasp.models.io import load_model
from bigasp.models.single_file import ldm_state_dict
from bigasp.sample.generate import GenerateSettings

REPO = Path(__file__).resolve().parents[1]
BIGASP = REPO / ".venv" / "bin" / "bigasp"
COMFY = json.loads((Path(__file__).parent / "data" / "comfyui_nodes.json").read_text())["nodes"]
UI = json.loads((Path(__file__).parent / "data" / "comfyui_workflow_schema.json").read_text())
WIDGETS = {"INT", "FLOAT", "STRING", "COMBO", "FILENAME"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def validate_comfy_api(graph: dict, ckpt_name: str) -> None:
    """Raise AssertionError unless `graph` is a valid ComfyUI API workflow for the recorded nodes."""
    assert graph, "empty workflow"
    for node_id, node in graph.items():
        cls = node["class_type"]
        assert cls in COMFY, f"node {node_id}: unknown ComfyUI node {cls!r}"
        spec = COMFY[cls]["required"]
        assert set(node["inputs"]) == set(spec), f"node {node_id} ({cls}): inputs {sorted(node['inputs'])}"
        for name, value in node["inputs"].items():
            want = spec[name]
            kind = want["type"]
            where = f"node {node_id} ({cls}).{name}"
            if kind not in WIDGETS:  # a link [source node id, output index] of this type
                assert isinstance(value, list) and len(value) == 2, f"{where}: not a link: {value!r}"
                src, idx = value
                assert src in graph, f"{where}: links to missing node {src!r}"
                outputs = COMFY[graph[src]["class_type"]]["outputs"]
                assert 0 <= idx < len(outputs) and outputs[idx] == kind, (
                    f"{where}: wants {kind}, gets {value}"
                )
            else:
                check_widget(where, want, value, ckpt_name)
    assert any(COMFY[n["class_type"]].get("output_node") for n in graph.values()), "no output node"


def check_widget(where: str, want: dict, value, ckpt_name) -> None:
    """One widget value against its recorded input definition. `ckpt_name` is the checkpoint's file
    name, or {folder: [file names]} for FILENAME inputs of several model folders (checkpoints, loras)."""
    kind = want["type"]
    if kind == "FILENAME":
        files = ckpt_name if isinstance(ckpt_name, dict) else {"checkpoints": [ckpt_name]}
        assert value in files.get(want["folder"], []), f"{where}: {value!r}"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a STRING"
    elif kind == "COMBO":
        assert value in want["choices"], f"{where}: {value!r} is not a ComfyUI choice"
    else:
        py = int if kind == "INT" else (int, float)
        assert isinstance(value, py) and not isinstance(value, bool), f"{where}: {value!r} is not {kind}"
        assert want["min"] <= value <= want["max"], f"{where}: {value} outside [{want['min']}, {want['max']}]"
        if kind == "INT" and "step" in want:
            assert (value - want["min"]) % want["step"] == 0, f"{where}: {value} off the step grid"


def _split_inputs(cls: str) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """A node's (link inputs, widget inputs), each in ComfyUI's input order."""
    spec = COMFY[cls]["required"].items()
    return [(n, w) for n, w in spec if w["type"] not in WIDGETS], [
        (n, w) for n, w in spec if w["type"] in WIDGETS
    ]


def validate_comfy_ui(ui: dict, ckpt_name: str, control_values=tuple(UI["control_values"])) -> None:
    """Raise AssertionError (or jsonschema's ValidationError) unless `ui` is a canvas workflow the
    ComfyUI frontend accepts and ComfyUI can run: schema 0.4, every node known, every widget value
    where the node's widget order puts it, every link joining an output to an input of its type."""
    Draft202012Validator(UI["schema"]).validate(ui)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]), "duplicate node ids"
    links = {link[0]: link for link in ui["links"]}
    assert len(links) == len(ui["links"]), "duplicate link ids"
    assert ui["last_node_id"] >= max(nodes) and ui["last_link_id"] >= max(links, default=0)
    for node in ui["nodes"]:
        cls, where = node["type"], f"node {node['id']} ({node['type']})"
        assert cls in COMFY, f"{where}: unknown ComfyUI node"
        link_inputs, widget_inputs = _split_inputs(cls)
        inputs = node.get("inputs", [])
        assert [(i["name"], i["type"]) for i in inputs] == [(n, w["type"]) for n, w in link_inputs], (
            f"{where}: input slots {inputs}"
        )
        for slot, i in enumerate(inputs):
            link = links.get(i.get("link"))
            assert link is not None, f"{where}.{i['name']}: not connected"
            assert (link[3], link[4], link[5]) == (node["id"], slot, i["type"]), (
                f"{where}.{i['name']}: {link}"
            )
        for slot, out in enumerate(node.get("outputs", [])):
            assert out["type"] == COMFY[cls]["outputs"][slot] and out.get("slot_index", slot) == slot, where
            for link_id in out.get("links") or []:
                assert links[link_id][1:3] == [node["id"], slot], f"{where} output {slot}: link {link_id}"
        if "widgets_values" not in node:
            continue  # the canvas keeps the defaults
        values = list(node["widgets_values"])
        for name, want in widget_inputs:
            assert values, f"{where}: no value for widget {name}"
            check_widget(f"{where}.{name}", want, values.pop(0), ckpt_name)
            if want.get("control_after_generate"):
                assert values and values[0] in control_values, f"{where}: no control value after {name}"
                values.pop(0)
        assert not values, f"{where}: extra widget values {values}"
    for link_id, origin, origin_slot, target, _, kind in ui["links"]:
        assert origin in nodes and target in nodes, f"link {link_id}: missing node"
        assert COMFY[nodes[origin]["type"]]["outputs"][origin_slot] == kind, (
            f"link {link_id}: not a {kind} output"
        )
        assert any(i.get("link") == link_id for i in nodes[target].get("inputs", [])), (
            f"link {link_id}: dangling"
        )
    assert any(COMFY[n["type"]].get("output_node") for n in ui["nodes"]), "no output node"


def api_from_ui(ui: dict) -> dict:
    """The API graph a canvas workflow stands for, read with the recorded node definitions."""
    links = {link[0]: link for link in ui["links"]}
    graph = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        _, widget_inputs = _split_inputs(node["type"])
        by_name = {i["name"]: links[i["link"]] for i in node["inputs"]}
        values = list(node["widgets_values"])
        widgets = {}
        for name, want in widget_inputs:
            widgets[name] = values.pop(0)
            if want.get("control_after_generate"):
                values.pop(0)
        inputs = {
            name: [str(by_name[name][1]), by_name[name][2]] if name in by_name else widgets[name]
            for name in COMFY[node["type"]]["required"]
        }
        graph[str(node["id"])] = {
            "class_type": node["type"],
            "inputs": inputs,
            "_meta": {"title": node.get("title", node["type"])},
        }
    return graph


def _node(graph: dict, cls: str) -> dict:
    (node,) = [n for n in graph.values() if n["class_type"] == cls]
    return node["inputs"]


def test_the_validator_rejects_what_comfyui_would():
    good = api_workflow("m.safetensors", ModelKind("flow", 1.0))
    validate_comfy_api(good, "m.safetensors")
    for breakage in (
        lambda g: _node(g, "KSampler").update(sampler_name="Euler a"),
        lambda g: _node(g, "KSampler").update(scheduler="Karras"),
        lambda g: _node(g, "ModelSamplingSD3").update(shift_value=_node(g, "ModelSamplingSD3").pop("shift")),
        lambda g: _node(g, "KSampler").update(positive=_node(g, "KSampler")["latent_image"]),
        lambda g: _node(g, "EmptyLatentImage").update(width=836),
        lambda g: _node(g, "KSampler").update(cfg=101.0),
        lambda g: g.update({"99": {"class_type": "ModelSamplingFlow", "inputs": {}}}),
    ):
        bad = json.loads(json.dumps(good))
        breakage(bad)
        with pytest.raises(AssertionError):
            validate_comfy_api(bad, "m.safetensors")


@pytest.mark.parametrize("shift", [1.0, 6.0])
def test_flow_workflow_is_the_cards_and_what_bigasp_generate_uses(shift):
    graph = api_workflow("bigasp_v25.safetensors", ModelKind("flow", shift))
    validate_comfy_api(graph, "bigasp_v25.safetensors")
    assert _node(graph, "ModelSamplingSD3")["shift"] == shift  # from the file's metadata
    ks = _node(graph, "KSampler")
    s = GenerateSettings.from_preset("bigasp-v2.5")
    assert (ks["sampler_name"], ks["scheduler"], ks["steps"], ks["cfg"], ks["seed"]) == (
        s.sampler,
        s.scheduler,
        s.steps,
        s.cfg,
        s.seed,
    )
    # v2.5 card: euler, beta schedule, PAG ~2.0 with CFG 2-5, negative "low quality".
    assert (ks["sampler_name"], ks["scheduler"]) == ("euler", "beta")
    assert _node(graph, "PerturbedAttentionGuidance")["scale"] == 2.0 and 2 <= ks["cfg"] <= 5
    texts = [n["inputs"]["text"] for n in graph.values() if n["class_type"] == "CLIPTextEncode"]
    assert graph[ks["negative"][0]]["inputs"]["text"] == "low quality" and len(texts) == 2
    chain = []  # KSampler <- PAG <- ModelSamplingSD3 <- CheckpointLoaderSimple
    link = ks["model"]
    while True:
        chain.append(graph[link[0]]["class_type"])
        if "model" not in graph[link[0]]["inputs"]:
            break
        link = graph[link[0]]["inputs"]["model"]
    assert chain == ["PerturbedAttentionGuidance", "ModelSamplingSD3", "CheckpointLoaderSimple"]


def test_no_pag_and_eps_variants_stay_valid():
    no_pag = GenerateSettings.from_preset("bigasp-v2.5", pag=0.0, cfg=5.0)
    graph = api_workflow("m.safetensors", ModelKind("flow", 3.0), no_pag)
    validate_comfy_api(graph, "m.safetensors")
    assert "PerturbedAttentionGuidance" not in {n["class_type"] for n in graph.values()}
    assert graph[_node(graph, "KSampler")["model"][0]]["class_type"] == "ModelSamplingSD3"
    eps = api_workflow("m.safetensors", ModelKind("eps"))
    validate_comfy_api(eps, "m.safetensors")
    assert "ModelSamplingSD3" not in {n["class_type"] for n in eps.values()}
    assert _node(eps, "KSampler")["sampler_name"] == "dpmpp_2m_sde"  # v2 card


VARIANTS = {
    "flow-shift-1": (ModelKind("flow", 1.0), None),
    "flow-shift-6": (ModelKind("flow", 6.0), None),
    "flow-no-pag": (ModelKind("flow", 3.0), GenerateSettings.from_preset("bigasp-v2.5", pag=0.0, cfg=5.0)),
    "eps": (ModelKind("eps"), None),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_ui_workflow_is_valid_and_says_what_the_api_workflow_says(variant):
    kind, settings = VARIANTS[variant]
    api = api_workflow("m.safetensors", kind, settings)
    ui = ui_workflow(api)
    validate_comfy_api(api, "m.safetensors")
    validate_comfy_ui(ui, "m.safetensors")
    assert api_from_ui(ui) == api  # read back with ComfyUI's own input order: the same graph
    assert ui["version"] == 0.4 and ui["last_node_id"] == len(api) and ui["last_link_id"] == len(ui["links"])
    (ks,) = [n for n in ui["nodes"] if n["type"] == "KSampler"]
    assert ks["widgets_values"][1] == "fixed"  # the seed stays the workflow's, not re-rolled per run
    # the same shape as the KSampler of the ComfyUI frontend's own default workflow
    (ref,) = [n for n in UI["default_graph"]["nodes"] if n["type"] == "KSampler"]
    assert [(i["name"], i["type"]) for i in ks["inputs"]] == [(i["name"], i["type"]) for i in ref["inputs"]]
    assert [type(v) is str for v in ks["widgets_values"]] == [
        type(v) is str or isinstance(v, bool) for v in ref["widgets_values"]
    ]
    boxes = [(*n["pos"], *n["size"]) for n in ui["nodes"]]  # laid out without overlaps
    for a in range(len(boxes)):
        for b in range(a):
            (x0, y0, w0, h0), (x1, y1, w1, h1) = boxes[a], boxes[b]
            assert x0 >= x1 + w1 or x1 >= x0 + w0 or y0 >= y1 + h1 or y1 >= y0 + h0, (a, b)


TITLE_CHAR_PX = 8  # the frontend's 14 px title font: "ModelSamplingSD3 (flow model: requir" filled 315 px


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_node_title_fits_its_node_on_the_canvas(variant):
    """The canvas cuts a title wider than its node ("flow model: requir…"): each title, at the
    frontend's ~8 px per character plus the collapse button's 30 px, fits the node's width."""
    kind, settings = VARIANTS[variant]
    loras = [LoraNode("a_rather_long_lora_file_name_v2.safetensors", 0.8, 0.4)]
    ui = ui_workflow(api_workflow("m.safetensors", kind, settings, loras=loras))
    for n in ui["nodes"]:
        assert 30 + TITLE_CHAR_PX * len(n["title"]) <= n["size"][0], (n["title"], n["size"])
    (flow,) = [n for n in ui["nodes"] if n["type"] == "ModelSamplingSD3"] or [None]
    if flow is not None:
        assert "required" in flow["title"]  # still says the node must stay


def test_the_ui_validator_accepts_comfyuis_default_workflow_and_rejects_breakage():
    ref = UI["default_graph"]
    validate_comfy_ui(ref, "v1-5-pruned-emaonly-fp16.safetensors", (*UI["control_values"], True))
    good = ui_workflow(api_workflow("m.safetensors", ModelKind("flow", 1.0)))

    def node(g, cls):
        return next(n for n in g["nodes"] if n["type"] == cls)

    def swap(values, i, j):
        values[i], values[j] = values[j], values[i]

    for breakage in (
        lambda g: node(g, "KSampler")["widgets_values"].pop(1),  # no control_after_generate value
        lambda g: swap(node(g, "KSampler")["widgets_values"], 4, 5),  # sampler <-> scheduler
        lambda g: swap(node(g, "KSampler")["widgets_values"], 0, 2),  # seed <-> steps: an INT off place
        lambda g: node(g, "KSampler")["widgets_values"].__setitem__(1, "random"),
        lambda g: swap(node(g, "KSampler")["inputs"], 1, 2),  # slots no longer in ComfyUI's order
        lambda g: g["links"][0].__setitem__(5, "CLIP"),  # a MODEL link typed CLIP
        lambda g: g["links"][0].__setitem__(2, 1),  # from the loader's CLIP output into a MODEL input
        lambda g: node(g, "EmptyLatentImage")["widgets_values"].append(1),
        lambda g: node(g, "VAEDecode").pop("order"),  # required by the frontend's schema
        lambda g: node(g, "VAEDecode").__setitem__("pos", [0]),
        lambda g: g.pop("last_link_id"),
        lambda g: g.update(version="0.4"),
        lambda g: node(g, "SaveImage").__setitem__("type", "SaveImageWebsocket"),
    ):
        bad = json.loads(json.dumps(good))
        breakage(bad)
        with pytest.raises((AssertionError, ValidationError)):
            validate_comfy_ui(bad, "m.safetensors")


def test_cli_export_flow_bf16_with_workflow_and_header_info(tmp_path):
    """The installed command: dtype, file mode, workflow beside the file, and `model info` on it."""
    out = tmp_path / "my_flow.safetensors"
    res = subprocess.run(
        [
            str(BIGASP),
            "model",
            "export",
            "tiny",
            str(out),
            "--prediction",
            "flow",
            "--shift",
            "3",
            "--dtype",
            "bf16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    with safe_open(str(out), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    api, ui, png = workflow_paths(out)
    assert (api.name, ui.name, png.name) == (
        "my_flow.workflow-api.json",
        "my_flow.workflow.json",
        "my_flow.workflow.png",
    )
    assert f"wrote {ui}" in res.stdout
    graph = json.loads(api.read_text())
    validate_comfy_api(graph, "my_flow.safetensors")
    assert _node(graph, "ModelSamplingSD3")["shift"] == 3.0
    canvas = json.loads(ui.read_text())
    validate_comfy_ui(canvas, "my_flow.safetensors")
    assert api_from_ui(canvas) == graph
    with Image.open(
        png
    ) as im:  # as ComfyUI's SaveImage writes: API graph in "prompt", canvas graph in "workflow"
        assert json.loads(im.info["prompt"]) == graph
        assert json.loads(im.info["workflow"]) == canvas
    for p in (api, ui, png):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644

    info = subprocess.run(
        [str(BIGASP), "model", "info", str(out)], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert info.returncode == 0, info.stderr
    got = json.loads(info.stdout)
    assert got["kind"] == {"format_version": 1, "prediction": "flow", "shift": 3.0} and got["kind_recorded"]
    assert {c: v["dtype"] for c, v in got["components"].items()} == dict.fromkeys(
        ("unet", "vae", "text_encoder", "text_encoder_2"), "bfloat16"
    )


def test_export_defaults_to_fp16_and_writes_no_workflow_for_eps(tmp_path):
    out = tmp_path / "eps.safetensors"
    res = CliRunner().invoke(app, ["model", "export", "tiny", str(out)])
    assert res.exit_code == 0, res.output
    reference = {k: v.to(torch.float16) for k, v in ldm_state_dict(load_model("tiny")).items()}
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == set(reference)
        for k in f.keys():  # noqa: SIM118
            t = f.get_tensor(k)
            assert t.dtype == torch.float16 and torch.equal(t, reference[k]), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eps.safetensors"]
    bad = CliRunner().invoke(
        app, ["model", "export", "tiny", str(tmp_path / "x.safetensors"), "--dtype", "int8"]
    )
    assert bad.exit_code != 0 and "--dtype" in str(bad.exception) + bad.output


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "m.safetensors"
    res = CliRunner().invoke(
        app, ["model", "export", "tiny", str(out), "--dtype", "fp32", "--prediction", "flow"]
    )
    assert res.exit_code == 0, res.output
    return out


def test_header_info_counts_equal_the_loaded_modules(fp32_export):
    info = single_file_info(fp32_export)
    loaded = load_model(fp32_export)
    assert {c: v["parameters"] for c, v in info["components"].items()} == {
        c: sum(p.numel() for p in m.parameters()) for c, m in loaded.modules().items()
    }
    with safe_open(str(fp32_export), "pt") as f:  # dtypes and metadata as safetensors itself reads them
        assert info["metadata"] == f.metadata()
        assert {k: list(e.shape) for k, e in read_header(fp32_export).tensors.items()} == {
            k: f.get_slice(k).get_shape()
            for k in f.keys()  # noqa: SIM118
        }
    assert info["kind"]["prediction"] == "flow" and info["tensors"] == len(read_header(fp32_export).tensors)


def test_info_never_reads_tensor_data(fp32_export, tmp_path):
    """A file whose data section is a hole (sparse: no tensor byte was ever written) gives the same
    info as the real file, so no tensor byte can have been needed."""
    sparse = tmp_path / "sparse.safetensors"
    with fp32_export.open("rb") as src, sparse.open("wb") as dst:
        dst.write(src.read(read_header(fp32_export).header_bytes))
    os.truncate(sparse, fp32_export.stat().st_size)
    full, from_header = single_file_info(fp32_export), single_file_info(sparse)
    for d in (full, from_header):
        d.pop("source")
    assert from_header == full


@pytest.mark.parametrize("keep", ["header only", "all but one byte"])
def test_info_calls_a_truncated_file_damaged(fp32_export, tmp_path, keep):
    """A header that points past the end of the file (an interrupted download) is damaged, not
    "fine": the installed command says so in one line naming the file, and safetensors (the
    reference reader) refuses the same file."""
    header = read_header(fp32_export)
    cut = tmp_path / "cut.safetensors"
    shutil.copy(fp32_export, cut)
    os.truncate(cut, header.header_bytes if keep == "header only" else fp32_export.stat().st_size - 1)
    with pytest.raises(SafetensorError):
        safe_open(str(cut), "pt")
    res = subprocess.run(
        [str(BIGASP), "model", "info", str(cut)], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert res.returncode == 2 and res.stdout == "", res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cut) in lines[0] and "damaged" in lines[0], res.stderr
    assert f"{fp32_export.stat().st_size:,}" in lines[0]  # the size the header requires


def test_info_on_a_file_imports_no_torch(fp32_export):
    code = (
        "import sys, json\nfrom bigasp.cli import main\n"
        "try:\n    main(['model', 'info', sys.argv[1]])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(json.dumps(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(fp32_export)], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"abc", "shorter than"),
        (b"\xff" * 8 + b"{}", "implausible"),
        (b"\x05" + b"\0" * 7 + b"{nope", "not JSON"),
    ],
)
def test_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as err:
        single_file_info(path)
    assert str(path) in str(err.value)


def test_docs_say_what_a_dragged_in_workflow_needs_and_gives():
    """Where the checkpoint must be (else ComfyUI's "Value not in list") and how close the image is."""
    docs = {n: (REPO / "docs" / n).read_text() for n in ("models.md", "generation.md")}
    for name, text in docs.items():
        flat = " ".join(text.split())
        assert "directly in" in flat or "directly into" in flat, name
        assert '"Value not in list"' in flat, name
        assert "up to float rounding (at most one 8-bit level in a few pixels)" in flat, name


def test_export_never_replaces_a_workflow_file_without_force(tmp_path):
    """Every file `model export` would write is checked before anything is loaded or written: an
    existing workflow file beside OUT stops it with one line naming that file, and nothing is
    replaced (the single file itself is not written either)."""
    out = tmp_path / "flow.safetensors"
    cmd = [str(BIGASP), "model", "export", "tiny", str(out), "--prediction", "flow"]
    for taken in workflow_paths(out):
        taken.write_bytes(b"the user's own file")
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
        assert res.returncode == 2, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and str(taken) in lines[0] and "--force" in lines[0], res.stderr
        assert taken.read_bytes() == b"the user's own file"
        assert sorted(p.name for p in tmp_path.iterdir()) == [taken.name]
        taken.unlink()
    taken.write_bytes(b"the user's own file")
    res = subprocess.run([*cmd, "--force"], capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr
    assert taken.read_bytes() != b"the user's own file" and out.is_file()


def test_export_of_a_flow_file_checks_its_workflow_files_first(fp32_export, tmp_path):
    """The kind recorded in the source file decides whether workflow files will be written; they are
    checked before the export starts, without --prediction on the command line."""
    out = tmp_path / "again.safetensors"
    taken = workflow_paths(out).png
    taken.write_bytes(b"keep me")
    res = subprocess.run(
        [str(BIGASP), "model", "export", str(fp32_export), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert res.returncode == 2 and str(taken) in res.stderr, res.stderr
    assert taken.read_bytes() == b"keep me" and not out.exists()
    assert (
        CliRunner().invoke(app, ["model", "export", str(fp32_export), str(out), "--no-workflow"]).exit_code
        == 0
    )
