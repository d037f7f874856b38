"""Generator end to end on the tiny preset: noise, determinism, presets, size errors, PNG metadata, CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bigasp.errors import BigaspError, ConfigError
from bigasp.models import ModelKind
from bigasp.sample import GenerateSettings, Generator, read_png_metadata, save_png
from bigasp.sample.generate import PRESETS, initial_noise
from bigasp.sample.model_sampling import EpsDiscrete, FlowConst, max_denoise


def small(preset: str = "bigasp-v2.5", **kw) -> GenerateSettings:
    return GenerateSettings.from_preset(preset, **{"width": 64, "height": 64, "steps": 3, **kw})


@pytest.fixture(scope="module")
def gen():
    from bigasp.models import build_preset

    return Generator(build_preset("tiny", seed=0, kind=ModelKind("flow", 1.0)), "cpu", torch.float32)


def test_initial_noise_is_comfyui_prepare_noise():
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        expected = torch.randn((3, 4, 8, 8), dtype=torch.float32, generator=None, device="cpu")
    assert torch.equal(initial_noise(1234, (3, 4, 8, 8)), expected)


def test_noise_scaling_start():
    eps, flow = EpsDiscrete(), FlowConst(1.0)
    n = torch.ones(1, 4, 2, 2)
    z = torch.zeros_like(n)
    assert max_denoise(eps, eps.sigma_max)
    s = eps.sigma_max
    torch.testing.assert_close(eps.noise_scaling(s, n, z, True), n * math.sqrt(1 + s * s))
    torch.testing.assert_close(flow.noise_scaling(1.0, n, z, True), n)


def test_presets_follow_the_cards():
    v25, v2 = GenerateSettings.from_preset("bigasp-v2.5"), GenerateSettings.from_preset("bigasp-v2")
    assert (v25.sampler, v25.scheduler, v25.cfg, v25.pag, v25.negative) == (
        "euler",
        "beta",
        3.0,
        2.0,
        "low quality",
    )
    assert (v2.sampler, v2.scheduler, v2.steps, v2.cfg, v2.pag) == ("dpmpp_2m_sde", "karras", 40, 3.0, 0.0)
    assert PRESETS["bigasp-v2.5"]["prediction"] == "flow" and PRESETS["bigasp-v2"]["prediction"] == "eps"
    with pytest.raises(ConfigError, match="unknown generation preset"):
        GenerateSettings.from_preset("sd15")


def test_size_must_be_multiple_of_8(gen):
    with pytest.raises(ConfigError, match="multiple of 8"):
        gen.generate("a cat", small(width=60))


def test_same_seed_same_image_and_png_roundtrip(gen, tmp_path):
    s = small(seed=7, batch=2)
    a = gen.generate(["a photo of a (cat:1.2)"], s)
    b = gen.generate(["a photo of a (cat:1.2)"], s)
    assert len(a) == 2 and a[0].size == (64, 64)
    assert gen.last_unet_calls == len(__import__("bigasp").sample.sigmas("flow", "beta", 3)) - 1
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))  # batch items differ
    c = gen.generate(["a photo of a (cat:1.2)"], small(seed=8, batch=2))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))

    path = save_png(a[1], tmp_path / "out.png")
    from PIL import Image

    with Image.open(path) as im:
        params = im.text["parameters"]
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(a[1]))
    lines = params.split("\n")
    assert lines[0] == "a photo of a (cat:1.2)"
    assert lines[1] == "Negative prompt: low quality"
    assert "Steps: 3, Sampler: Euler, Schedule type: Beta, CFG scale: 3.0, Seed: 7, Size: 64x64" in lines[2]
    assert "PAG scale: 2.0" in lines[2] and "Batch pos: 1" in lines[2] and "Shift: 1.0" in lines[2]
    meta = read_png_metadata(path)
    assert GenerateSettings.model_validate(meta["settings"]) == s
    assert meta["batch_index"] == 1 and meta["model"]["kind"]["prediction"] == "flow"


def test_eps_sde_preset_is_deterministic_and_prompt_grouping_exact(gen):
    s = small("bigasp-v2", prediction="eps", steps=3, seed=3)
    long_prompt = ", ".join(["dog"] * 90)  # 2 chunks
    alone = gen.generate(["a cat"], s)[0]
    together = gen.generate(["a cat", long_prompt], s)
    assert np.array_equal(np.asarray(alone), np.asarray(together[0]))
    assert len(together) == 2


@pytest.mark.parametrize("noise", ["brownian", "iid"])
def test_sde_image_does_not_depend_on_its_batch_mates(gen, noise):
    """Image k alone equals image k sampled with other prompts (noise keyed per prompt)."""
    s = small("bigasp-v2", prediction="eps", steps=4, seed=11, batch=2, noise=noise, pag=0.0)
    prompts = ["a red cat", "a blue dog", "a green bird"]
    together = gen.sample(prompts, s)
    for k, p in enumerate(prompts):
        alone = gen.sample([p], s)
        # same noise; only batched UNet arithmetic differs (fp32 rounding, ~1e-4 after 4 steps;
        # noise shared across the call instead would differ by O(1))
        torch.testing.assert_close(together[2 * k : 2 * k + 2], alone, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(together[0], together[1], atol=1e-2)  # batch items differ


def test_default_sde_noise_is_the_brownian_tree():
    assert GenerateSettings().noise == "brownian"


def test_cli_generate_writes_png(tmp_path):
    from bigasp.cli import main

    main(["generate", "a cat", "--model", "tiny", "--size", "64x64", "--steps", "2",
          "--seed", "5", "--out", str(tmp_path)])  # fmt: skip
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["5-00-00.png"]
    meta = read_png_metadata(files[0])
    assert meta["settings"]["seed"] == 5 and meta["settings"]["sampler"] == "dpmpp_2m_sde"  # eps preset


def test_cli_bad_size_is_clear_error(tmp_path, capsys):
    from bigasp.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "a cat", "--model", "tiny", "--size", "63x64", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_cli_settings_from_preset_and_flags(caplog):
    from bigasp.sample.commands import build_settings

    s = build_settings(ModelKind("flow", 6.0), "auto", steps=12, size="896x1152", cfg=None)
    assert (s.sampler, s.scheduler, s.steps, s.cfg, s.width, s.height) == (
        "euler",
        "beta",
        12,
        3.0,
        896,
        1152,
    )
    assert s.shift is None  # taken from the model kind at sampling time
    s = build_settings(ModelKind("eps"), "auto", sampler="dpmpp_3m_sde", scheduler="exponential")
    assert (s.sampler, s.scheduler, s.steps) == ("dpmpp_3m_sde", "exponential", 40)
    with caplog.at_level("WARNING"):
        build_settings(ModelKind("eps"), "bigasp-v2.5")
    assert "--prediction flow" in caplog.text
    with pytest.raises(ConfigError, match="WIDTHxHEIGHT"):
        build_settings(ModelKind("eps"), "auto", size="832*1216")
    with pytest.raises(ConfigError, match="sampler"):
        build_settings(ModelKind("eps"), "auto", sampler="ddim")


@pytest.mark.gpu
def test_cuda_fp16_unet_fp32_vae_is_deterministic():
    """GPU twin of test_same_seed_same_image_and_png_roundtrip: fp16 UNet, fp32 VAE decode."""
    from bigasp.models import build_preset

    g = Generator(build_preset("tiny", seed=0, kind=ModelKind("flow", 1.0)), "cuda", torch.float16)
    assert next(g.model.vae.parameters()).dtype == torch.float32
    assert next(g.model.unet.parameters()).dtype == torch.float16
    a = g.generate("a cat", small(seed=4))
    b = g.generate("a cat", small(seed=4))
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


NESTED = "(" * 3000 + "a" + ")" * 3000
BAD_INPUT = {  # one per check, run through the installed executable
    "cfg-nan": (["a cat", "--cfg", "nan"], "cfg: Input should be a finite number"),
    "weight-inf": (["(a:inf)"], "weight inf of 'a' is out of range"),
    "nested-comfy": ([NESTED], "nests parentheses more than 200 deep"),
    "too-large": (["a cat", "--size", "8192x1024"], "width 8192 is larger than 4096 pixels"),
    "cuda-missing": (["a cat", "--device", "cuda"], "no CUDA GPU is available here"),
    "unknown-device": (["a cat", "--device", "tpu9"], "--device 'tpu9' is not a device"),
    "out-is-a-file": (["a cat", "--out", "OUTFILE"], "is an existing file, not a folder"),
}
MORE_BAD_PROMPTS = {  # the same checks again, in-process (the same entry point, minus a process start)
    "weight-nan": (["(a:nan) cat"], "weight nan of 'a' is out of range"),
    "weight-huge-negative": (["(a:-1e30)"], "weight -1e+30 of 'a' is out of range"),
    "nested-a1111": ([NESTED, "--syntax", "a1111"], "is out of range"),
    "negative-prompt": (["a cat", "--negative", "(ugly:inf)"], "weight inf of 'ugly' is out of range"),
}


def test_cli_rejects_bad_generate_input_in_one_line_before_loading(tmp_path):
    """The installed `bigasp` refuses each bad input with one line and exit 2, writing nothing."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("bigasp")
    outfile = tmp_path / "taken.png"
    outfile.write_bytes(b"not mine")
    cmds = {}
    for name, (args, _) in BAD_INPUT.items():
        if name == "cuda-missing" and torch.cuda.is_available():
            continue
        args = [str(outfile) if a == "OUTFILE" else a for a in args]
        if "--out" not in args:
            args += ["--out", str(tmp_path / name)]
        cmds[name] = [str(exe), "generate", *args, "--model", "no-such-model-folder", "--steps", "1"]
    names = list(cmds)
    for first in range(0, len(names), 2):  # two at a time: CI has two cores
        procs = {n: subprocess.Popen(cmds[n], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for n in names[first : first + 2]}  # fmt: skip
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 2, (name, err)
            assert BAD_INPUT[name][1] in err, (name, err)
            assert "Traceback" not in err and out == "" and len(err.strip().splitlines()) <= 2, (name, err)
            assert "no-such-model-folder" not in err, name  # refused before the model is looked at
            assert not (tmp_path / name).exists(), name
    assert outfile.read_bytes() == b"not mine"


@pytest.mark.parametrize("case", sorted(MORE_BAD_PROMPTS))
def test_cli_rejects_more_bad_prompts_in_one_line(case, tmp_path, capsys):
    from bigasp.cli import main

    args, message = MORE_BAD_PROMPTS[case]
    with pytest.raises(SystemExit) as exit_:
        main(["generate", *args, "--model", "no-such-model-folder", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a1111_deep_nesting_is_refused_not_a_black_image():
    from bigasp.sample.prompts import parse

    with pytest.raises(ConfigError, match="out of range"):
        parse(NESTED, "a1111")
    assert parse("((a))", "a1111") == [("a", pytest.approx(1.21))]
    # the deepest nesting still allowed parses without recursion trouble
    deep = "(" * 200 + "a:1.5" + ")" * 200
    assert parse(deep, "comfy") == [("a", 1.5)]


def test_non_finite_samples_are_an_error_not_a_black_png(gen):
    s = small().model_copy(update={"cfg": float("inf")})  # bypasses validation, as a library caller might
    with pytest.raises(BigaspError, match="NaN/inf"):
        gen.generate("a cat", s)


@pytest.fixture(scope="module")
def fp16_file(tmp_path_factory):
    """A tiny SDXL single file stored in fp16, with non-trivial weights."""
    from bigasp.models import build_preset
    from bigasp.models.single_file import save_single_file

    m = build_preset("tiny", seed=3, kind=ModelKind("flow", 1.0))
    return save_single_file(m, tmp_path_factory.mktemp("fp16") / "m.safetensors", dtype=torch.float16)


def _fp32_reference(path, settings):
    """Today's fp32 path: the file's tensors cast to fp32 modules at load."""
    from bigasp.models.io import load_model

    return Generator(load_model(path), "cpu", torch.float32).generate("a red cube", settings)[0]


def test_fp32_run_from_an_fp16_file_keeps_fp16_weights_and_the_same_image(fp16_file):
    from bigasp.sample.commands import load_for_generate

    settings = small(cfg=2.0, pag=1.0, steps=2)
    m = load_for_generate(str(fp16_file), None, (torch.float32, torch.float32), "cpu", [])
    gen = Generator(m, "cpu", torch.float32)
    for comp, module in m.modules().items():  # stored as in the file: 2 bytes a weight
        assert {p.dtype for p in module.parameters()} == {torch.float16}, comp
        n = sum(p.numel() for p in module.parameters())
        assert sum(p.numel() * p.element_size() for p in module.parameters()) == 2 * n, comp
    got = gen.generate("a red cube", settings)[0]
    assert np.array_equal(np.asarray(got), np.asarray(_fp32_reference(fp16_file, settings)))
    # Each layer computes in fp32: its weight reads widen (the fp16 storage is untouched).
    w = m.unet.conv_in.weight
    assert w.dtype == torch.float32 and m.unet.conv_in.parametrizations.weight.original.dtype == torch.float16


def test_fp16_run_after_widening_casts_the_stored_weights(fp16_file):
    """A Generator asked for another dtype than a module widens to drops the widening first."""
    from bigasp.models.cast_at_use import compute_dtype
    from bigasp.sample.commands import load_for_generate

    m = load_for_generate(str(fp16_file), None, (torch.float32, torch.float32), "cpu", [])
    Generator(m, "cpu", torch.bfloat16)
    assert {p.dtype for p in m.unet.parameters()} == {torch.bfloat16}
    assert compute_dtype(m.unet) == torch.bfloat16 and compute_dtype(m.vae) == torch.float32


def test_cli_fp32_image_from_an_fp16_file_equals_the_fp32_loaded_one(fp16_file, tmp_path):
    from PIL import Image

    from bigasp.cli import main

    main(["generate", "a red cube", "--model", str(fp16_file), "--size", "64x64", "--steps", "2",
          "--seed", "5", "--device", "cpu", "--no-progress", "--out", str(tmp_path)])  # fmt: skip
    (png,) = tmp_path.glob("*.png")
    meta = read_png_metadata(png)
    settings = GenerateSettings.model_validate(meta["settings"])
    want = _fp32_reference(fp16_file, settings)
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(want.convert("RGB")))
