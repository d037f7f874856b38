"""Annotate: each stage's preprocessing against its reference, the stages end to end through the
CLI on tiny models in the published folder layouts, one decode per image, per-image failures,
stop-and-resume without duplicates, 2 ranks == 1 rank, merge precedence and provenance, and
bigASP's JoyCaption prompt mix."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from bigasp.annotate import decode, tiny
from bigasp.annotate.config import AnnotateConfig, CaptionConfig, MergeConfig, TagsConfig
from bigasp.annotate.merge import merge
from bigasp.annotate.prompts import load_prompt_set
from bigasp.annotate.run import annotate
from bigasp.cli import main
from bigasp.errors import BigaspError, DataError, ModelLoadError
from bigasp.prep.config import IngestConfig
from bigasp.prep.ingest import ingest
from bigasp.store import annotations as store
from bigasp.store.info import dataset_info
from bigasp.store.manifest import read_manifest

SRC = Path(__file__).parents[1] / "src"
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "clip": tiny.clip_vision(d / "clip-vit-tiny"),
        "joytag": tiny.onnx_tagger(d / "joytag-tiny", kind="joytag"),
        "wd": tiny.onnx_tagger(d / "wd-tiny", kind="wd"),
        "owl": tiny.owlv2(d / "owlv2-tiny"),
        "llava": tiny.llava(d / "joycaption-tiny"),
    }


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """9 images: JPEG/PNG, portrait/landscape, EXIF-rotated, RGBA; sidecars on two of them."""
    d = tmp_path_factory.mktemp("ann")
    src = d / "src"
    src.mkdir()
    sizes = [(120, 90), (90, 120), (100, 100), (130, 80), (64, 48), (80, 130), (110, 110)]
    for k, (w, h) in enumerate(sizes):
        picture(w, h, k).save(src / f"im{k}.jpg", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6
    picture(120, 90, 50).save(src / "rot.jpg", quality=92, exif=exif.tobytes())
    rgba = picture(70, 50, 51).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(src / "alpha.png")
    (src / "im0.json").write_text(
        json.dumps({"tags": ["sidecar_tag"], "caption": "a sidecar caption", "score": 7})
    )
    (src / "im1.json").write_text(json.dumps({"watermark": False, "score": 0}))
    ingest([src], d / "ds", IngestConfig(allow_upscale=True, progress=False))
    return d / "ds"


def copy_ds(ds: Path, to: Path) -> Path:
    shutil.copytree(ds, to, ignore=shutil.ignore_patterns("annotations"))
    return to


def cfg_for(models, stages, **kw) -> AnnotateConfig:
    base = {
        "stages": stages,
        "embed": {"model": str(models["clip"])},
        "tags": {"model": str(models["joytag"])},
        "watermark": {"model": str(models["owl"]), "threshold": 0.9},
        "caption": {"model": str(models["llava"]), "max_new_tokens": 6, "batch_size": 3, "dtype": "fp32"},
        "device": "cpu",
        "num_workers": 0,
        "batch_size": 4,
        "progress": False,
    }
    for k, v in kw.items():
        if isinstance(v, dict):
            base[k] = {**base.get(k, {}), **v}
        else:
            base[k] = v
    return AnnotateConfig(**base)


def manifest_images(ds: Path) -> dict[str, Image.Image]:
    """Each image decoded the plain way (Pillow, EXIF transpose, RGB on white), keyed by id."""
    m = read_manifest(*_fs(ds)).to_pydict()
    out = {}
    for i, path in zip(m["id"], m["path"], strict=True):
        im = ImageOps.exif_transpose(Image.open(path))
        if im.mode == "RGBA":
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im, mask=im.getchannel("A"))
            im = bg
        out[i] = im.convert("RGB")
    return out


def _fs(ds: Path):
    from bigasp.store import layout

    return layout.url_to_fs(str(ds))


def worker_inputs(ds: Path, prepares: dict) -> dict[str, dict]:
    jobs = [
        j.__class__(j.id, j.ref, j.orientation, tuple(prepares))
        for j in decode.manifest_jobs(read_manifest(*_fs(ds)))
    ]
    dataset = decode.DecodeDataset(jobs, prepares, max_pixels=10**9)
    out = {}
    for k in range(len(dataset)):
        _, inputs, _, reason, detail = dataset[k]
        assert not reason, detail
        out[jobs[k].id] = inputs
    return out


# --- preprocessing against references -------------------------------------------------------------


def test_embed_input_is_clip_image_processor_output_bit_for_bit(ingested, models):
    """The worker's embed input equals transformers' CLIPImageProcessor on the upright image."""
    from transformers import CLIPImageProcessor

    from bigasp.annotate.embed import EmbedPrepare

    ref = CLIPImageProcessor()  # openai/clip-vit-base-patch32's settings: 224 shortest edge, 224 crop
    ours = worker_inputs(ingested, {"embed": EmbedPrepare(ref)})
    for image_id, im in manifest_images(ingested).items():
        expected = ref(images=im, return_tensors="np")["pixel_values"][0]
        assert ours[image_id]["embed"].shape == (3, 224, 224)
        np.testing.assert_array_equal(ours[image_id]["embed"], expected)


def test_embedding_is_cls_before_post_layernorm(models):
    from bigasp.annotate.config import EmbedConfig
    from bigasp.annotate.embed import ClipEmbedder

    emb = ClipEmbedder(EmbedConfig(model=str(models["clip"])), torch.device("cpu"))
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        out = emb.model(pixel_values=torch.from_numpy(x))
    got = emb.forward(x)
    assert got.dtype == np.float16 and got.shape == (3, emb.model.config.hidden_size)
    np.testing.assert_array_equal(got, out.last_hidden_state[:, 0].numpy().astype(np.float16))
    assert not np.allclose(got, out.pooler_output.numpy(), atol=1e-2)  # pooler = post_layernorm(CLS)


def test_tag_input_white_centred_square_and_normalisation():
    from bigasp.annotate.tags import TagPrepare, joytag_input, wd_input

    im = Image.new("RGB", (100, 60), (200, 10, 30))
    sq = TagPrepare(100)(im)  # no resize: the pad is exact
    assert sq.shape == (100, 100, 3)
    assert (sq[:20] == 255).all() and (sq[80:] == 255).all()  # (100 - 60) // 2 = 20 rows above, 20 below
    assert (sq[20:80] == [200, 10, 30]).all()
    tall = TagPrepare(90)(Image.new("RGB", (31, 90), (0, 0, 0)))
    assert (tall[:, :29] == 255).all() and (tall[:, 29:60] == 0).all() and (tall[:, 60:] == 255).all()
    small = TagPrepare(448)(im)
    assert small.shape == (448, 448, 3)
    # bicubic of the padded square, as JoyTag's and WD's prepare_image
    ref = Image.new("RGB", (100, 100), (255, 255, 255))
    ref.paste(im, (0, 20))
    np.testing.assert_array_equal(small, np.asarray(ref.resize((448, 448), Image.Resampling.BICUBIC)))
    j = joytag_input(sq[None])
    assert j.shape == (1, 3, 100, 100)
    np.testing.assert_allclose(j[0, :, 0, 0], (1.0 - CLIP_MEAN) / CLIP_STD, rtol=1e-6)
    np.testing.assert_allclose(
        j[0, :, 50, 50], (np.array([200, 10, 30]) / 255.0 - CLIP_MEAN) / CLIP_STD, rtol=1e-5
    )
    w = wd_input(sq[None])
    assert w.shape == (1, 100, 100, 3) and w.dtype == np.float32
    assert w[0, 50, 50].tolist() == [30.0, 10.0, 200.0]  # BGR, 0..255


def test_watermark_input_grey_top_left_and_transformers_pad_placement():
    from transformers import Owlv2ImageProcessor

    from bigasp.annotate.watermark import WatermarkPrepare

    im = Image.new("RGB", (100, 60), (200, 10, 30))
    sq = WatermarkPrepare(100)(im)
    assert (sq[:60] == [200, 10, 30]).all() and (sq[60:] == 128).all()  # pasted at (0, 0), grey below
    side = WatermarkPrepare(100)(Image.new("RGB", (40, 100), (0, 0, 0)))
    assert (side[:, :40] == 0).all() and (side[:, 40:] == 128).all()  # grey to the right
    big = WatermarkPrepare(960)(im)
    ref = Image.new("RGB", (100, 100), (128, 128, 128))
    ref.paste(im, (0, 0))
    np.testing.assert_array_equal(big, np.asarray(ref.resize((960, 960), Image.Resampling.BICUBIC)))
    # transformers' OWLv2 processor also pads bottom/right (same placement, so boxes map back the same way)
    proc = Owlv2ImageProcessor()
    arr = np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0
    padded = proc.pad(arr)
    assert padded.shape == (3, 100, 100)
    np.testing.assert_array_equal(padded[:, :60], arr)
    assert np.unique(padded[:, 60:]).size == 1  # constant fill below the image
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        assert (padded[:, 60:] == 0).all()  # black in transformers 5, where bigASP used grey 128


def test_boxes_back_in_original_coordinates():
    from bigasp.annotate.watermark import boxes_to_image

    # 200x100 image on a 200x200 square: normalised x/y * 200, clipped to the image
    px = boxes_to_image(np.array([[0.1, 0.2, 0.5, 0.45], [0.9, 0.4, 1.2, 0.7]]), 200, 100)
    np.testing.assert_allclose(px, [[20, 40, 100, 90], [180, 80, 200, 100]])
    px = boxes_to_image(np.array([[0.25, 0.5, 0.75, 1.0]]), 50, 100)  # portrait: square side 100
    np.testing.assert_allclose(px, [[25, 50, 50, 100]])


def test_caption_input_squish_and_tokens(models):
    from bigasp.annotate.caption import CaptionPrepare, JoyCaption

    im = Image.new("RGB", (100, 60), (200, 10, 30))
    out = CaptionPrepare(384)(picture(100, 60, 3))
    np.testing.assert_array_equal(
        out, np.asarray(picture(100, 60, 3).resize((384, 384), Image.Resampling.LANCZOS))
    )
    assert CaptionPrepare(32)(im).shape == (32, 32, 3)
    jc = JoyCaption(CaptionConfig(model=str(models["llava"]), dtype="fp32"), torch.device("cpu"))
    text = jc.conversation_text("Write a MidJourney prompt for this image.")
    assert "You are a helpful image captioner." in text and text.rstrip().endswith("<|end_header_id|>")
    ids = jc.input_ids("Write a MidJourney prompt for this image.")
    assert ids.count(jc.image_token_id) == jc.image_seq_length == 16
    run = [k for k, t in enumerate(ids) if t == jc.image_token_id]
    assert run == list(range(run[0], run[0] + 16))  # one contiguous run where the template put <image>
    px = jc.pixel_values(np.full((1, 32, 32, 3), 255, np.uint8))
    assert torch.allclose(px, torch.ones_like(px))  # /255, mean 0.5, std 0.5


def test_caption_decode_is_bigasps(models):
    """Captions are decoded as bigASP's caption-images.py did, checked against transformers'
    tokenizer called with its exact arguments: batch_decode(skip_special_tokens=False,
    clean_up_tokenization_spaces=False), then <|eot_id|> and <|finetune_right_pad_id|> removed
    and the text stripped. The tiny tokenizer cleans up spaces by default, so leaving the
    default would show."""
    from transformers import AutoTokenizer

    from bigasp.annotate.caption import JoyCaption, decode_captions

    tok = AutoTokenizer.from_pretrained(str(models["llava"]), local_files_only=True)
    assert tok.clean_up_tokenization_spaces

    def bigasp(ids) -> list[str]:
        captions = tok.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        captions = (c.replace("<|eot_id|>", "") for c in captions)
        captions = (c.replace("<|finetune_right_pad_id|>", "") for c in captions)
        return [c.strip() for c in captions]

    words = ["a", "dog", ".", "<|start_header_id|>", "photo", ",", "cat", "<|eot_id|>"]
    ids = torch.tensor([tok.convert_tokens_to_ids(words + ["<|finetune_right_pad_id|>"] * 2)])
    assert decode_captions(tok, ids) == bigasp(ids) == ["a dog . <|start_header_id|> photo , cat"]

    # the whole generate path: the same sampled ids, decoded both ways
    cfg = CaptionConfig(model=str(models["llava"]), dtype="fp32", max_new_tokens=24)
    jc = JoyCaption(cfg, torch.device("cpu"))
    batch = np.stack([jc.prepare(picture(40, 30, s)) for s in range(4)])
    prompt = "Write a MidJourney prompt for this image."
    got = jc.generate(batch, prompt, seed=3)
    ids_in = torch.tensor([jc.input_ids(prompt)] * len(batch))
    torch.manual_seed(3)
    with torch.inference_mode():
        out = jc.model.generate(input_ids=ids_in, pixel_values=jc.pixel_values(batch),
                                attention_mask=torch.ones_like(ids_in), max_new_tokens=24, do_sample=True,
                                suppress_tokens=None, use_cache=True)  # fmt: skip
    want = bigasp(out[:, ids_in.shape[1] :])
    assert got == want
    default = [t.strip() for t in tok.batch_decode(out[:, ids_in.shape[1] :], skip_special_tokens=True)]
    assert default != want  # the tokenizer's defaults would give other captions here


# --- prompt mix -----------------------------------------------------------------------------------


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_prompt_mix_probabilities_match_bigasp():
    ps = load_prompt_set("alpha-two")
    rng = np.random.default_rng(123)
    n = 20000
    types, words, sfw = Counter(), Counter(), 0
    for _ in range(n):
        ctype, prompt = ps.draw(rng)
        types[ctype] += 1
        sfw += prompt.endswith(" Include whether the image is sfw, suggestive, or nsfw.")
        assert "{" not in prompt and prompt.startswith(ps.types[ctype][1].split("{")[0])
        words[int(prompt.split("within ")[1].split(" words")[0])] += 1
    se = lambda p: 4 * math.sqrt(p * (1 - p) / n)  # noqa: E731
    for t, p in {
        "Descriptive": 0.6,
        "Descriptive (Informal)": 0.1,
        "Training Prompt": 0.2,
        "MidJourney": 0.1,
    }.items():
        assert abs(types[t] / n - p) < se(p), (t, types[t] / n)
    assert abs(sfw / n - 0.25) < se(0.25)
    # int(N(45, 30)) rounded up to a multiple of 10, clamped to [20, 170]
    expected = {20: _phi((21 - 45) / 30), 170: 1 - _phi((161 - 45) / 30)}
    for c in range(30, 170, 10):
        expected[c] = _phi((c + 1 - 45) / 30) - _phi((c - 9 - 45) / 30)
    assert set(words) <= set(expected) and math.isclose(sum(expected.values()), 1.0, rel_tol=1e-9)
    for c, p in expected.items():
        assert abs(words[c] / n - p) < se(p) + 1e-3, (c, words[c] / n, p)
    beta = load_prompt_set("beta-one")
    assert beta.types["Stable Diffusion Prompt"][1].endswith("{word_count} words or less.")


# --- end to end -----------------------------------------------------------------------------------


def test_cli_all_stages_end_to_end(ingested, models, tmp_path, capsys):
    ds = copy_ds(ingested, tmp_path / "ds")
    cfg = tmp_path / "annotate.toml"
    cfg.write_text('[annotate]\nnum_workers = 1\nbatch_size = 4\n[annotate.watermark]\nthreshold = 0.9\n'
                   '[annotate.caption]\nmax_new_tokens = 6\nbatch_size = 3\ndtype = "fp32"\n')  # fmt: skip
    main(["annotate", str(ds), "--config", str(cfg), "--embed-model", str(models["clip"]),
          "--tags-model", str(models["joytag"]), "--watermark-model", str(models["owl"]),
          "--caption-model", str(models["llava"]), "--device", "cpu", "--no-progress", "--json"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    ids = set(read_manifest(*_fs(ds)).column("id").to_pylist())
    for stage in ("embed", "tags", "watermark"):
        assert summary["stages"][stage]["done"] == 9
        assert set(store.read_stage(ds, stage).column("id").to_pylist()) == ids
    assert summary["stages"]["caption"]["done"] == 8  # im1 has score 0: not captioned (bigASP)
    emb = store.read_embeddings(ds)
    assert emb.vectors.shape == (9, 32) and emb.vectors.dtype == np.float16
    caps = store.read_stage(ds, "caption")
    assert all(isinstance(c, str) for c in caps.column("caption").to_pylist())
    assert "<|eot_id|>" not in " ".join(caps.column("caption").to_pylist())
    prov = store.read_provenance(store.list_parts(ds, "tags", "joytag-tiny")[0])
    assert prov["settings"]["threshold"] == 0.4 and prov["files"]["model.onnx"].startswith("blake2b-128:")
    assert prov["bigasp_version"] and prov["model"] == "joytag-tiny"
    cap_prov = store.read_provenance(store.list_parts(ds, "caption", "joycaption-tiny")[0])
    assert cap_prov["settings"]["prompt_set"] == "alpha-two" and cap_prov["settings"]["temperature"] == 0.6
    info = dataset_info(str(ds))["annotations"]
    assert info["embed/clip-vit-tiny"] == {"done": 9, "failed": 0}
    assert info["caption/joycaption-tiny"] == {"done": 8, "failed": 0}
    main(["dataset", "info", str(ds)])
    text = capsys.readouterr().out
    assert "annotations" in text and "tags/joytag-tiny" in text and "88.9%" in text  # captions: 8 of 9
    # a second run finds everything done
    main(["annotate", str(ds), "--config", str(cfg), "--embed-model", str(models["clip"]), "--device", "cpu",
          "--no-progress", "--json"])  # fmt: skip
    again = json.loads(capsys.readouterr().out)
    assert again["stages"]["embed"] == {**again["stages"]["embed"], "done": 0, "skipped": 9}


def test_tags_match_model_outputs_joytag_and_wd(ingested, models, tmp_path):
    """Kept tags are the ones whose probability passes each tagger's rule, computed here from the
    ONNX weights in numpy (not through onnxruntime)."""
    import onnx
    from onnx import numpy_helper

    from bigasp.annotate.tags import TagPrepare, joytag_input, wd_input

    for kind in ("joytag", "wd"):
        ds = copy_ds(ingested, tmp_path / kind)
        annotate(ds, cfg_for(models, ["tags"], tags={"model": str(models[kind])}))
        got = store.read_stage(ds, "tags").to_pylist()
        init = {
            t.name: numpy_helper.to_array(t)
            for t in onnx.load(str(models[kind] / "model.onnx")).graph.initializer
        }
        inputs = worker_inputs(ingested, {"tags": TagPrepare(64)})
        for row in got:
            sq = inputs[row["id"]]["tags"][None]
            if kind == "joytag":
                p = 1 / (1 + np.exp(-(joytag_input(sq).mean(axis=(2, 3)) @ init["W"] + init["B"])))[0]
                keep = [f"tag_{i}" for i in range(len(p)) if p[i] > 0.4]
                assert row["tags"] == keep and row["rating"] is None
            else:
                p = 1 / (1 + np.exp(-(wd_input(sq).mean(axis=(1, 2)) @ init["W"] + init["B"])))[0]
                cats = [9 if i < 4 else (4 if i % 5 == 0 else 0) for i in range(len(p))]
                keep = [
                    i
                    for i in range(len(p))
                    if (cats[i] == 0 and p[i] > 0.35) or (cats[i] == 4 and p[i] > 0.85)
                ]
                keep.sort(key=lambda i: -p[i])
                assert row["tags"] == [f"tag_{i}" for i in keep]
                assert (
                    row["rating"]
                    == ["general", "sensitive", "questionable", "explicit"][int(np.argmax(p[:4]))]
                )
            np.testing.assert_allclose(
                row["probs"], sorted(row["probs"], reverse=True) if kind == "wd" else row["probs"]
            )
            assert len(row["probs"]) == len(row["tags"])


def test_watermark_matches_direct_model_call(ingested, models, tmp_path):
    from transformers import AutoTokenizer, Owlv2ForObjectDetection

    from bigasp.annotate.watermark import WatermarkPrepare, boxes_to_image

    ds = copy_ds(ingested, tmp_path / "wm")
    annotate(ds, cfg_for(models, ["watermark"]))
    got = {r["id"]: r for r in store.read_stage(ds, "watermark").to_pylist()}
    model = Owlv2ForObjectDetection.from_pretrained(str(models["owl"])).eval()
    tok = AutoTokenizer.from_pretrained(str(models["owl"]))
    text = tok(["a watermark"], return_tensors="pt")
    images = manifest_images(ingested)
    inputs = worker_inputs(ingested, {"watermark": WatermarkPrepare(64)})
    flagged = 0
    for image_id, row in got.items():
        x = torch.from_numpy(np.array(inputs[image_id]["watermark"])).permute(2, 0, 1)[None].float() / 255
        x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        with torch.inference_mode():
            out = model(**text, pixel_values=x)
        scores = torch.sigmoid(out.logits[0].max(-1).values)
        keep = scores > 0.9
        cx, cy, w, h = out.pred_boxes[0][keep].unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).numpy()
        assert row["watermark"] == bool(keep.any())
        np.testing.assert_allclose(row["max_score"], scores.max().item(), rtol=1e-5)
        np.testing.assert_allclose(np.array(row["boxes"]).reshape(-1, 4), boxes, atol=1e-5)
        iw, ih = images[image_id].size
        np.testing.assert_allclose(
            np.array(row["boxes_px"]).reshape(-1, 4), boxes_to_image(boxes, iw, ih), atol=1e-3
        )
        flagged += row["watermark"]
    assert flagged > 0


def test_one_decode_per_image_feeds_every_model(ingested, models, tmp_path, monkeypatch):
    calls = Counter()
    real = decode.decode_image

    def counting(data, orientation, **kw):
        calls[len(data)] += 1
        return real(data, orientation, **kw)

    monkeypatch.setattr(decode, "decode_image", counting)
    ds = copy_ds(ingested, tmp_path / "once")
    s = annotate(ds, cfg_for(models, ["embed", "tags", "watermark"]))
    assert sum(calls.values()) == 9 and set(calls.values()) == {1}
    assert s.images_decoded == 9
    assert all(s.stages[st].done == 9 for st in ("embed", "tags", "watermark"))


def test_bad_images_recorded_with_reason_and_run_goes_on(ingested, models, tmp_path):
    ds = copy_ds(ingested, tmp_path / "bad")
    m = read_manifest(*_fs(ds)).to_pydict()
    paths = dict(zip(m["id"], m["path"], strict=True))
    # the manifest points at the shared source folder: work on copies of two files instead
    victims = sorted(paths)[:2]
    (tmp_path / "gone.jpg").write_bytes(Path(paths[victims[0]]).read_bytes())
    data = Path(paths[victims[1]]).read_bytes()
    (tmp_path / "corrupt.jpg").write_bytes(data[:200] + b"\x00" * 50)  # bytes changed since ingest
    import pyarrow as pa

    table = read_manifest(*_fs(ds))
    new_paths = [str(tmp_path / "gone.jpg") if i == victims[0] else str(tmp_path / "corrupt.jpg")
                 if i == victims[1] else p for i, p in zip(m["id"], m["path"], strict=True)]  # fmt: skip
    table = table.set_column(table.schema.get_field_index("path"), "path", pa.array(new_paths))
    pq.write_table(table, ds / "manifest.parquet")
    (tmp_path / "gone.jpg").unlink()
    s = annotate(ds, cfg_for(models, ["embed", "tags"]))
    assert s.stages["embed"].done == 7 and dict(s.stages["embed"].failed) == {
        "unreadable": 1,
        "changed_since_ingest": 1,
    }
    fails = store.read_failures(ds, "tags", "joytag-tiny").to_pylist()
    assert {f["id"]: f["reason"] for f in fails} == {
        victims[0]: "unreadable",
        victims[1]: "changed_since_ingest",
    }
    assert dataset_info(str(ds))["annotations"]["tags/joytag-tiny"] == {"done": 7, "failed": 2}
    again = annotate(ds, cfg_for(models, ["embed"]))  # failures are not retried unless asked
    assert again.stages["embed"].done == 0 and again.stages["embed"].skipped == 9


def test_model_error_on_one_image_is_recorded(ingested, models, tmp_path, monkeypatch):
    from bigasp.annotate.tags import OnnxTagger

    real = OnnxTagger.probabilities
    calls = {"n": 0}

    def flaky(self, batch):
        calls["n"] += 1
        if (
            len(batch) > 1 or (batch[0] == 255).mean() > 0.3
        ):  # batches fail; images with much white pad fail alone
            raise RuntimeError("simulated kernel failure")
        return real(self, batch)

    monkeypatch.setattr(OnnxTagger, "probabilities", flaky)
    ds = copy_ds(ingested, tmp_path / "err")
    s = annotate(ds, cfg_for(models, ["tags"]))
    n_failed = s.stages["tags"].failed["model_error"]
    assert 0 < n_failed < 9 and s.stages["tags"].done == 9 - n_failed
    fails = store.read_failures(ds, "tags", "joytag-tiny").to_pylist()
    assert all("simulated kernel failure" in f["detail"] for f in fails)


def _all_rows(ds: Path, stage: str) -> list[dict]:
    rows = []
    key = store.list_models(ds, stage)[0]
    for p in store.list_parts(ds, stage, key):
        rows += pq.read_table(p).to_pylist()
    return rows


def test_stop_after_parts_then_resume_same_results_no_duplicates(ingested, models, tmp_path):
    full = copy_ds(ingested, tmp_path / "full")
    annotate(full, cfg_for(models, ["embed", "tags", "caption"], part_size=2))
    part = copy_ds(ingested, tmp_path / "part")
    first = annotate(part, cfg_for(models, ["embed", "tags", "caption"], part_size=2, limit_parts=2))
    assert first.stopped_early and first.stages["embed"].done < 9
    assert len(store.list_parts(part, "embed", "clip-vit-tiny")) == 2
    annotate(part, cfg_for(models, ["embed", "tags", "caption"], part_size=2))
    for stage in ("embed", "tags", "caption"):
        rows = _all_rows(part, stage)
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)), f"{stage}: duplicate ids after resume"
        a, b = store.read_stage(full, stage), store.read_stage(part, stage)
        assert a.column("id").equals(b.column("id"))
        if stage == "embed":
            np.testing.assert_allclose(store.read_embeddings(full).vectors, store.read_embeddings(part).vectors,
                                       rtol=1e-3, atol=1e-3)  # fmt: skip
        elif stage == "tags":
            assert a.column("tags").equals(b.column("tags"))
        else:  # captions: each image once; prompts depend on batch composition, which a resume changes
            assert set(b.column("caption_type").to_pylist()) <= set(load_prompt_set("alpha-two").mix)


def test_killed_process_resumes_without_duplicates(ingested, models, tmp_path):
    """SIGKILL a real `bigasp annotate` once its first caption parts are on disk, then resume."""
    import signal

    from hold_helpers import start_held

    ds = copy_ds(ingested, tmp_path / "kill")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bigasp", "annotate", str(ds), "--caption-model", str(models["llava"]),
           "--set", "caption.max_new_tokens=4", "--set", "caption.batch_size=1", "--set", 'caption.dtype="fp32"',
           "--part-size", "1", "--device", "cpu", "--num-workers", "0", "--no-progress"]  # fmt: skip
    proc, _ = start_held(cmd, "annotate.part.caption:2", env=env)  # waits right after its 2nd caption part
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = len(_all_rows(ds, "caption"))
    assert before == 2
    s = annotate(ds, cfg_for(models, ["caption"], part_size=1, caption={"max_new_tokens": 4}))
    assert s.stages["caption"].skipped == before and s.stages["caption"].done == 8 - before
    ids = [r["id"] for r in _all_rows(ds, "caption")]
    assert len(ids) == len(set(ids)) == 8


def test_cli_annotate_write_failure_is_one_line_and_a_rerun_finishes(ingested, models, tmp_path):
    """A real OS write failure through `bigasp annotate`: a file-size limit (RLIMIT_FSIZE; the
    kernel fails writes past it with EFBIG, as a full disk fails them with ENOSPC, and Python
    ignores SIGXFSZ) that the first parts fit and a later, larger part does not. One line naming
    that part, what is kept and how to continue; the parts before it untouched; a re-run without
    the limit finishes with the result of an uninterrupted run."""
    import hashlib
    import resource

    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}

    def cli(ds: Path, limit: int | None = None) -> subprocess.CompletedProcess:
        def small_files() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

        cmd = [sys.executable, "-m", "bigasp", "annotate", str(ds), "--stage", "tags",
               "--tags-model", str(models["joytag"]), "--part-size", "1", "--device", "cpu",
               "--num-workers", "0", "--no-progress", "--json"]  # fmt: skip
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180,
                              preexec_fn=small_files if limit else None)  # fmt: skip

    def digests(paths: list[Path]) -> list[str]:
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]

    # One image a part, written in order: the limit lets every part up to the first one larger than
    # all before it be written (sizes measured on an uninterrupted run; same model, same bytes).
    full = copy_ds(ingested, tmp_path / "full")
    res = cli(full)
    assert res.returncode == 0, res.stderr[-3000:]
    full_parts = store.list_parts(full, "tags", "joytag-tiny")
    sizes = [p.stat().st_size for p in full_parts]
    assert len(sizes) == 9
    fails_at = next((i for i in range(1, 9) if sizes[i] > max(sizes[:i])), None)
    assert fails_at is not None, f"no part is larger than every part before it: {sizes}"
    limit = max(sizes[:fails_at])

    ds = copy_ds(ingested, tmp_path / "ds")
    res = cli(ds, limit)
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    kept = store.list_parts(ds, "tags", "joytag-tiny")
    assert len(kept) == fails_at
    session = kept[0].name.split("-r")[0]
    failed = store.stage_dir(ds, "tags", "joytag-tiny") / store.part_name(session, 0, fails_at + 1)
    assert lines[0] == (
        f"error: writing {failed} failed (File too large); the tags parts written before it "
        f"({fails_at} by this run) are kept and no partial file is left: free space (or fix the disk) "
        "and run the same command again to continue: images in parts already written are not done again"
    )
    assert not failed.exists() and not [p for p in ds.rglob("*") if p.name.startswith(".tmp")]
    assert digests(kept) == digests(full_parts[:fails_at])  # the same bytes an uninterrupted run wrote
    before = digests(kept)

    res = cli(ds)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)["stages"]["tags"]
    assert summary["skipped"] == fails_at and summary["done"] == 9 - fails_at
    assert digests(kept) == before
    ids = [r["id"] for r in _all_rows(ds, "tags")]
    assert len(ids) == len(set(ids)) == 9
    a, b = store.read_stage(full, "tags"), store.read_stage(ds, "tags")
    assert a.column("id").equals(b.column("id")) and a.column("tags").equals(b.column("tags"))
    np.testing.assert_allclose(
        np.concatenate(a.column("probs").to_pylist()),
        np.concatenate(b.column("probs").to_pylist()),
        rtol=1e-5,
    )


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one(ingested, models, tmp_path):
    one = copy_ds(ingested, tmp_path / "one")
    annotate(one, cfg_for(models, ["embed", "tags", "watermark"]))
    two = copy_ds(ingested, tmp_path / "two")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "bigasp", "annotate", str(two), "--embed-model", str(models["clip"]),
           "--tags-model", str(models["joytag"]), "--watermark-model", str(models["owl"]),
           "--set", "watermark.threshold=0.9", "--device", "cpu", "--num-workers", "0",
           "--batch-size", "4", "--no-progress", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Loading weights" not in proc.stderr  # the libraries' own loading bars stay quiet
    assert '"world_size": 2' in proc.stdout and '"done": 9' in proc.stdout
    ranks = {p.name.split("-r")[1][:5] for p in (two / "annotations").rglob("*.parquet")}
    assert ranks == {"00000", "00001"}
    np.testing.assert_allclose(
        store.read_embeddings(one).vectors, store.read_embeddings(two).vectors, rtol=1e-3, atol=1e-3
    )
    for stage in ("tags", "watermark"):
        a, b = store.read_stage(one, stage), store.read_stage(two, stage)
        assert a.column("id").equals(b.column("id"))
        assert a.column("tags" if stage == "tags" else "watermark").equals(
            b.column("tags" if stage == "tags" else "watermark")
        )


# --- merge ----------------------------------------------------------------------------------------


def test_merge_precedence_and_provenance(ingested, models, tmp_path):
    ds = copy_ds(ingested, tmp_path / "merge")
    annotate(ds, cfg_for(models, ["tags", "watermark", "caption"]))
    m0 = read_manifest(*_fs(ds)).to_pydict()
    by_path = {Path(p).name: i for i, p in zip(m0["id"], m0["path"], strict=True)}
    im0, im1, im2 = by_path["im0.jpg"], by_path["im1.jpg"], by_path["im2.jpg"]
    tags = {r["id"]: r["tags"] for r in store.read_stage(ds, "tags").to_pylist()}
    wm = {r["id"]: r["watermark"] for r in store.read_stage(ds, "watermark").to_pylist()}
    caps = {r["id"]: r["caption"] for r in store.read_stage(ds, "caption").to_pylist()}

    report = merge(str(ds), MergeConfig())  # sidecars win
    m = {r["id"]: r for r in read_manifest(*_fs(ds)).to_pylist()}
    assert m[im0]["tags"] == ["sidecar_tag"] and m[im0]["captions"] == ["a sidecar caption"]
    assert m[im2]["tags"] == tags[im2] and m[im2]["captions"] == [caps[im2]]
    assert m[im1]["watermark"] is False and m[im2]["watermark"] == wm[im2]
    assert m[im1]["captions"] in (None, [])  # score 0: never captioned, nothing to fill
    assert m[im0]["score"] == 7 and m[im2]["score"] is None  # no quality results yet
    assert (
        report["columns"]["tags"]["from_sidecars"] == 1 and report["columns"]["tags"]["from_annotations"] == 8
    )
    meta = json.loads((ds / "dataset.json").read_text())["annotations"]
    assert meta["precedence"] == "sidecar"
    assert meta["stages"]["tags"]["settings"]["threshold"] == 0.4
    assert meta["stages"]["caption"]["settings"]["prompt_set"] == "alpha-two"

    merge(str(ds), MergeConfig(precedence="annotations"))  # from the sidecar snapshot, not the last merge
    m = {r["id"]: r for r in read_manifest(*_fs(ds)).to_pylist()}
    assert m[im0]["tags"] == tags[im0] and m[im0]["captions"] == [caps[im0]]
    assert m[im1]["watermark"] == wm[im1]
    merge(str(ds), MergeConfig())  # and back: the sidecar values were not lost
    m = {r["id"]: r for r in read_manifest(*_fs(ds)).to_pylist()}
    assert m[im0]["tags"] == ["sidecar_tag"] and m[im1]["watermark"] is False


def test_merge_takes_scores_from_quality_results(ingested, tmp_path):
    import pyarrow as pa

    ds = copy_ds(ingested, tmp_path / "q")
    ids = read_manifest(*_fs(ds)).column("id").to_pylist()
    table = pa.table({"id": ids, "score": pa.array([3] * len(ids), pa.int8())})
    store.write_part(
        ds, "quality", "scorer", table, session="t", rank=0, seq=1, provenance={"model": "scorer"}
    )
    merge(str(ds), MergeConfig(columns=["score"]))
    scores = dict(zip(ids, read_manifest(*_fs(ds)).column("score").to_pylist(), strict=True))
    assert sorted(scores.values()) == [0, 3, 3, 3, 3, 3, 3, 3, 7]  # sidecar scores (7, 0) win


def test_ingest_keeps_merged_annotations_and_sees_sidecar_edits(tmp_path):
    """Ingest rebuilds the manifest from the sidecars; it re-applies the recorded merge, so merged
    annotations survive, and an edited sidecar is what the merge then starts from."""
    import pyarrow as pa

    src = tmp_path / "src"
    src.mkdir()
    for k in range(3):
        picture(96, 96, 100 + k).save(src / f"p{k}.jpg", quality=92)
    (src / "p0.txt").write_text("old caption")
    ds = tmp_path / "ds"
    cfg = IngestConfig(allow_upscale=True, progress=False)
    ingest([src], ds, cfg)

    def caps() -> dict[str, list[str]]:
        m = read_manifest(*_fs(ds)).to_pydict()
        return dict(zip(m["id"], m["captions"], strict=True))

    m = read_manifest(*_fs(ds)).to_pydict()
    by_name = {Path(p).name: i for i, p in zip(m["id"], m["path"], strict=True)}
    ids = [by_name[f"p{k}.jpg"] for k in range(3)]
    table = pa.table({"id": ids, "caption": ["model a", "model b", "model c"], "caption_type": ["x"] * 3,
                      "prompt": ["p"] * 3})  # fmt: skip
    store.write_part(ds, "caption", "cap", table, session="t", rank=0, seq=0, provenance={"model": "cap"})
    merge(str(ds), MergeConfig(columns=["captions"]))
    assert caps() == {ids[0]: ["old caption"], ids[1]: ["model b"], ids[2]: ["model c"]}

    (src / "p0.txt").write_text("edited caption")
    os.utime(src / "p0.txt", (1, 1))  # a different mtime whatever the clock
    (src / "p1.txt").write_text("new sidecar caption")
    ingest([src], ds, cfg)
    assert caps() == {ids[0]: ["edited caption"], ids[1]: ["new sidecar caption"], ids[2]: ["model c"]}
    (src / "p1.txt").unlink()
    ingest([src], ds, cfg)  # the sidecar is gone: the annotation fills the caption again
    assert caps()[ids[1]] == ["model b"]


# --- bad input ------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(ingested, models, tmp_path):
    with pytest.raises(DataError, match="not a bigasp dataset"):
        annotate(tmp_path / "nothing", cfg_for(models, ["embed"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(ingested / "dataset.json", empty / "dataset.json")
    with pytest.raises(DataError, match="run `bigasp ingest` first"):
        annotate(empty, cfg_for(models, ["embed"]))
    with pytest.raises(ModelLoadError, match="hub id"):
        annotate(ingested, cfg_for(models, ["embed"], embed={"model": "openai/clip-vit-base-patch32"}))
    bad_tags = tiny.onnx_tagger(tmp_path / "mismatch", kind="joytag", wrong_tags=3)
    with pytest.raises(ModelLoadError, match=r"outputs 12 tag scores but top_tags\.txt lists 15"):
        annotate(ingested, cfg_for(models, ["tags"], tags={"model": str(bad_tags)}))
    no_template = tiny.llava(tmp_path / "no-template", chat_template=False)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="no chat template"):
        annotate(ingested, cfg_for(models, ["caption"], caption={"model": str(no_template)}))
    no_image = shutil.copytree(models["llava"], tmp_path / "no-image-token")
    (no_image / "chat_template.jinja").write_text(tiny.LLAVA_TEMPLATE.replace("<image> ", ""))
    with pytest.raises(ModelLoadError, match="places the image token"):
        annotate(ingested, cfg_for(models, ["caption"], caption={"model": str(no_image)}))
    with pytest.raises(BigaspError, match="nothing to do"):
        annotate(ingested, AnnotateConfig(device="cpu"))
    with pytest.raises(BigaspError, match="neither a built-in set"):
        load_prompt_set("gamma-three")
    with pytest.raises(Exception, match="kind"):
        TagsConfig(kind="clip")
    assert not (ingested / "annotations").exists()  # failed loads wrote nothing


def test_help_lists_annotate():
    from typer.testing import CliRunner

    from bigasp.cli import app

    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "annotate" in top.output and "ingest -> annotate -> encode" in top.output
    sub = runner.invoke(app, ["annotate", "--help"])
    assert sub.exit_code == 0 and "merge" in sub.output and "run" in sub.output
    bench = runner.invoke(app, ["bench", "annotate", "--help"])
    assert bench.exit_code == 0 and "images/s per stage" in bench.output


@pytest.mark.gpu
def test_cuda_image_stages_match_cpu(ingested, models, tmp_path):
    """GPU twin of the end-to-end tests: the same results on CUDA as on CPU (within fp32 kernel noise)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cpu, gpu = copy_ds(ingested, tmp_path / "cpu"), copy_ds(ingested, tmp_path / "gpu")
    annotate(cpu, cfg_for(models, ["embed", "tags", "watermark"]))
    annotate(gpu, cfg_for(models, ["embed", "tags", "watermark"], device="cuda"))
    np.testing.assert_allclose(
        store.read_embeddings(cpu).vectors, store.read_embeddings(gpu).vectors, atol=2e-2
    )
    assert store.read_stage(cpu, "tags").column("tags").equals(store.read_stage(gpu, "tags").column("tags"))
    a, b = store.read_stage(cpu, "watermark"), store.read_stage(gpu, "watermark")
    np.testing.assert_allclose(a.column("max_score").to_numpy(), b.column("max_score").to_numpy(), atol=1e-3)


def test_bench_annotate_runs_every_stage():
    from bigasp.annotate.bench import run_annotate_bench

    r = run_annotate_bench(images=2, width=64, height=48, num_workers=0, seed=0, device=torch.device("cpu"),
                           command="bigasp bench annotate --images 2")  # fmt: skip
    for key in (
        "decode_img_s",
        "embed_img_s",
        "tags_img_s",
        "watermark_img_s",
        "fused_img_s",
        "caption_img_s",
    ):
        assert r.metrics[key] > 0
    assert r.metrics["watermark_prepare_ms"] > 0
    assert r.table_row().startswith("| annotate | ")


def test_beta_one_prompt_set_has_every_caption_type_of_joycaption_beta_one():
    """Every caption type of JoyCaption Beta One's demo app (its CAPTION_TYPE_MAP), in its order,
    with the app's texts for the booru tag lists, which the set once lacked."""
    ps = load_prompt_set("beta-one")
    assert list(ps.types) == [
        "Descriptive", "Descriptive (Casual)", "Straightforward", "Stable Diffusion Prompt", "MidJourney",
        "Danbooru tag list", "e621 tag list", "Rule34 tag list", "Booru-like tag list", "Art Critic",
        "Product Listing", "Social Media Post",
    ]  # fmt: skip
    danbooru = (
        "Generate only comma-separated Danbooru tags (lowercase_underscores). Strict order: `artist:`, "
        "`copyright:`, `character:`, `meta:`, then general tags. Include counts (1girl), appearance, clothing, "
        "accessories, pose, expression, actions, background. Use precise Danbooru syntax. No extra text."
    )
    assert ps.types["Danbooru tag list"] == [danbooru, danbooru + " {word_count} words or less.",
                                             danbooru + " {length} length."]  # fmt: skip
    e621 = (
        "comma-separated list of e621 tags in alphabetical order for this image. Start with the artist, "
        "copyright, character, species, meta, and lore tags (if any), prefixed by 'artist:', 'copyright:', "
        "'character:', 'species:', 'meta:', and 'lore:'. Then all the general tags."
    )
    assert ps.types["e621 tag list"] == [f"Write a {e621}", f"Write a {e621} Keep it under {{word_count}} words.",
                                         f"Write a {{length}} {e621}"]  # fmt: skip
    rule34 = (
        "comma-separated list of rule34 tags in alphabetical order for this image. Start with the artist, "
        "copyright, character, and meta tags (if any), prefixed by 'artist:', 'copyright:', 'character:', and "
        "'meta:'. Then all the general tags."
    )
    assert ps.types["Rule34 tag list"] == [f"Write a {rule34}",
                                           f"Write a {rule34} Keep it under {{word_count}} words.",
                                           f"Write a {{length}} {rule34}"]  # fmt: skip
    assert ps.types["Descriptive"][0] == "Write a detailed description for this image."
    assert all(len(t) == 3 for t in ps.types.values())


def test_builtin_image_stats_embedder_through_the_cli(ingested, tmp_path):
    """`--embed-model builtin:image-stats`: every image embedded through the decode workers equals the
    embedder applied to the plainly decoded image, and its contrast statistics are numpy's std."""
    from bigasp.annotate.config import EmbedConfig
    from bigasp.annotate.stats_embed import STATS_DIM, ImageStatsEmbedder, features
    from bigasp.cli import main

    ds = copy_ds(ingested, tmp_path / "ds")
    main(["annotate", str(ds), "--stage", "embed", "--embed-model", "builtin:image-stats", "--device", "cpu",
          "--num-workers", "0", "--no-progress"])  # fmt: skip
    emb = store.read_embeddings(ds)
    assert emb.model_key == "image-stats" and emb.vectors.shape == (9, STATS_DIM)
    images = manifest_images(ds)
    direct = ImageStatsEmbedder(EmbedConfig(model="builtin:image-stats"))(list(images.values()))
    np.testing.assert_allclose(
        emb.lookup(list(images)).astype(np.float32), direct.astype(np.float32), rtol=1e-3, atol=1e-3
    )
    im = next(iter(images.values()))
    std = np.asarray(im, np.float32).reshape(-1, 3).std(axis=0) / 255.0
    np.testing.assert_allclose(features(im)[14:17], np.log(std + 1e-3), rtol=1e-5)
