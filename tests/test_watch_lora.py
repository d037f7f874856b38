"""`bigasp watch --lora`: every checkpoint sampled with the LoRAs merged once into a fresh load, giving the
very images `bigasp generate --lora` gives on that checkpoint alone; nothing leaks between checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bigasp.cli import main
from bigasp.models import SDXL, build_preset
from bigasp.models.io import save_diffusers_folder
from bigasp.sample import read_png_metadata
from bigasp.sample.lora import LoraError, LoraSpec
from bigasp.sample.watch import Watcher
from lora_helpers import RANK, write_diffusers, write_kohya
from test_watch import make_checkpoint

pytest.importorskip("peft")

FAST = ["--size", "64x64", "--steps", "2", "--device", "cpu", "--no-progress"]


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.int16)


@pytest.fixture
def loras(tmp_path):
    """A strong kohya LoRA (UNet and text encoder 1 layers) and a diffusers one, as `--lora` texts."""
    shape = build_preset("tiny", seed=0)
    kohya, diffusers = tmp_path / "style.safetensors", tmp_path / "detail.safetensors"
    write_kohya(kohya, shape, 1, alpha=RANK * 20.0)
    write_diffusers(diffusers, shape, 2)
    return [(kohya, 0.8), (diffusers, 0.5)]


def _lora_args(loras) -> list[str]:
    return [a for f, w in loras for a in ("--lora", f"{f}:{w}")]


def _generate(model_dir, out, loras) -> np.ndarray:
    main(["generate", "a cat", "--model", str(model_dir), "--seed", "3", "--out", str(out), *FAST, *_lora_args(loras)])  # fmt: skip
    (png,) = out.glob("*.png")
    return _pixels(png)


@pytest.mark.parametrize("ema", [False, True], ids=["model", "ema"])
def test_two_checkpoints_with_loras_equal_generate_on_each_alone(tmp_path, loras, ema):
    run = tmp_path / "run"
    folder = "ema" if ema else "model"
    cks = []
    for k, samples in enumerate((100, 200)):  # different weights per checkpoint, and in ema/ vs model/
        ck = make_checkpoint(run / "checkpoints", samples, model=build_preset("tiny", seed=k))
        save_diffusers_folder(build_preset("tiny", seed=10 + k), ck / "ema")
        cks.append(ck)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    args = ["watch", str(run), "--prompts", str(prompts), "--seeds", "3", "--once", *FAST, *_lora_args(loras)]
    main([*args, "--ema"] if ema else args)
    gallery = run / ("samples-ema" if ema else "samples")
    want_record = [{"file": str(f), "weight": w} for f, w in loras]
    for k, ck in enumerate(cks):
        png = gallery / ck.name / "p000-seed3.png"
        alone = _generate(ck / folder, tmp_path / f"alone{k}", loras)
        assert np.array_equal(_pixels(png), alone), f"{ck.name} differs from generate --lora on it alone"
        assert read_png_metadata(png)["model"]["loras"] == want_record
        assert 'LoRA: "style: 0.8, detail: 0.5"' in Image.open(png).text["parameters"]
        assert json.loads((gallery / ck.name / "done.json").read_text())["loras"] == want_record
    assert "LoRA style: 0.8, detail: 0.5" in (gallery / "index.html").read_text()
    plain = _generate(cks[1] / folder, tmp_path / "plain", [])
    assert np.abs(plain - _pixels(gallery / cks[1].name / "p000-seed3.png")).max() > 0  # the LoRA mattered


def test_lora_never_reaches_the_shared_base_components(tmp_path, loras):
    """UNet-only checkpoints borrow the text encoders from --base: the LoRA (which has text encoder
    layers) is merged into a copy for each checkpoint, so both come out as generate on the full model."""
    base = build_preset("tiny", seed=0)
    save_diffusers_folder(base, tmp_path / "base")
    run = tmp_path / "run"
    for samples in (100, 200):
        make_checkpoint(run / "checkpoints", samples, model=SDXL(unet=base.unet, kind=base.kind))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    main(["watch", str(run), "--prompts", str(prompts), "--seeds", "3", "--once", "--base", str(tmp_path / "base"),
          *FAST, *_lora_args(loras)])  # fmt: skip
    want = _generate(tmp_path / "base", tmp_path / "alone", loras)
    for name in ("step-000000000100", "step-000000000200"):
        assert np.array_equal(_pixels(run / "samples" / name / "p000-seed3.png"), want), name


def test_a_bad_lora_stops_before_any_checkpoint_is_sampled(tmp_path, capsys):
    run = tmp_path / "run"
    model = build_preset("tiny", seed=0)
    for samples in (100, 200):
        make_checkpoint(run / "checkpoints", samples, model=model)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(SystemExit) as err:
        main(["watch", str(run), "--prompts", str(prompts), "--once", *FAST, "--lora", f"{missing}:0.7"])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "--lora" in lines[0]
    assert not (run / "samples").exists()

    # a file that is no LoRA of this model: the first checkpoint's merge fails and the watcher stops
    # (not skip every checkpoint in turn), leaving no partial sample folder behind
    junk = tmp_path / "junk.safetensors"
    save_file({"something_else": torch.zeros(2)}, str(junk))
    w = Watcher(run, ["a cat"], [0], device="cpu", loras=[LoraSpec(junk, 1.0)])
    with pytest.raises(LoraError, match=r"junk\.safetensors"):
        w.run_once()
    assert not (run / "samples").exists() or not any((run / "samples").iterdir())


def test_a_gallery_mixing_lora_settings_is_flagged(tmp_path, caplog, loras):
    samples = tmp_path / "run" / "samples"
    for name, record in (
        ("step-000000000100", []),
        ("step-000000000200", [{"file": "x.safetensors", "weight": 1.0}]),
    ):
        (samples / name).mkdir(parents=True)
        (samples / name / "done.json").write_text(
            json.dumps({"samples_seen": int(name[5:]), "loras": record})
        )
    specs = [LoraSpec(f, w) for f, w in loras]
    want = [{"file": str(f), "weight": w} for f, w in loras]
    (samples / "step-000000000300").mkdir()
    (samples / "step-000000000300" / "done.json").write_text(json.dumps({"samples_seen": 300, "loras": want}))
    with caplog.at_level("WARNING"):
        Watcher(tmp_path / "run", ["a cat"], [0], loras=specs).warn_if_mixed()
    assert "2 checkpoint(s) sampled with other LoRAs" in caplog.text and "--out" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        Watcher(tmp_path / "run", ["a cat"], [0], out_dir=tmp_path / "new", loras=specs).warn_if_mixed()
    assert caplog.text == ""
    page = Watcher(tmp_path / "run", ["a cat"], [0]).write_gallery().read_text()
    assert page.count("LoRA ") == 2 and "LoRA x: 1" in page and "LoRA style: 0.8, detail: 0.5" in page
