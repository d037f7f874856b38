"""`bigasp model extract-lora`: a planted low-rank difference comes back through diffusers' own
kohya-LoRA loader (the `generate --lora` path), its truncation error is the SVD tail numpy computes,
and the extract generates the tuned model's image."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from bigasp.models import build_preset
from bigasp.models.extract_lora import ExtractSettings, extract_lora, lora_targets
from bigasp.models.io import load_model, save_diffusers_folder
from bigasp.sample.lora import LoraSpec, apply_loras

REPO = Path(__file__).resolve().parents[1]
BIGASP = REPO / ".venv" / "bin" / "bigasp"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PLANTED = 2  # rank of the difference planted in every layer
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _plant(module: torch.nn.Module, seed: int, rank: int = PLANTED, scale: float = 0.05) -> torch.Tensor:
    """Add a random rank-`rank` difference to a Linear/Conv2d weight; returns it."""
    w = module.weight
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(w.shape[0], rank, generator=g)
    b = torch.randn(rank, w[0].numel(), generator=g)
    delta = (scale * a @ b / rank**0.5).reshape(w.shape)
    with torch.no_grad():
        w += delta
    return delta


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base and a 'finetune' of it with a rank-2 difference in every layer kohya's LoRA
    (with conv layers) covers, saved as diffusers folders."""
    root = tmp_path_factory.mktemp("extract")
    base = build_preset("tiny", seed=0)
    tuned = copy.deepcopy(base)
    planted = {}
    for k, comp in enumerate(LORA_COMPONENTS):
        for j, t in enumerate(lora_targets(comp, getattr(tuned, comp), with_conv=True)):
            planted[(comp, t.module)] = _plant(getattr(tuned, comp).get_submodule(t.module), 1000 * k + j)
    save_diffusers_folder(base, root / "base")
    save_diffusers_folder(tuned, root / "tuned")
    return root, planted


def _merged(root: Path, lora: Path):
    m = load_model(root / "base", LORA_COMPONENTS)
    return apply_loras(m, [LoraSpec(lora, 1.0)])


def test_planted_low_rank_difference_is_recovered(models, tmp_path):
    """At rank >= the planted rank with no clamp, base + extract (merged by diffusers' kohya loader)
    equals the tuned model in every weight within fp32 rounding; conv 3x3 layers included."""
    root, planted = models
    out = tmp_path / "x.safetensors"
    s = ExtractSettings(rank=4, conv_rank=3, clamp_quantile=1.0, dtype="fp32")
    _, layers = extract_lora(str(root / "base"), str(root / "tuned"), out, s)
    assert layers == len(planted)
    merged, tuned = _merged(root, out), load_model(root / "tuned", LORA_COMPONENTS)
    for comp in LORA_COMPONENTS:
        got, want = getattr(merged, comp).state_dict(), getattr(tuned, comp).state_dict()
        assert set(got) == set(want)
        for k in want:
            # fp32 rounding of an SVD and a merge of weights ~0.5: a few ulps times sqrt(size)
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=f"{comp}.{k}")
    convs = [m for (c, m) in planted if c == "unet" and planted[(c, m)].ndim == 4]
    assert any(planted[("unet", m)].shape[-1] == 3 for m in convs)  # 3x3 convs were covered
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["bigasp_base"] == str(root / "base") and meta["bigasp_base_identity"].startswith("sdxl-")
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_mlp_fc1") for k in keys)
    assert (
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.alpha" in keys
    )  # SGM name (tiny: 1 layer per block)


def test_lower_rank_error_is_the_svd_tail(tmp_path):
    """Below the planted rank, the merge error of a layer is sqrt(sum of the dropped singular values
    squared), as numpy's SVD of the planted difference says (Eckart-Young)."""
    base = build_preset("tiny", seed=0)
    tuned = copy.deepcopy(base)
    lin = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    conv = "up_blocks.0.resnets.1.conv1"  # a 3x3 conv
    deltas = {m: _plant(tuned.unet.get_submodule(m), i, rank=5, scale=0.2) for i, m in enumerate((lin, conv))}
    save_diffusers_folder(base, tmp_path / "base")
    save_diffusers_folder(tuned, tmp_path / "tuned")
    out = tmp_path / "low.safetensors"
    extract_lora(
        str(tmp_path / "base"),
        str(tmp_path / "tuned"),
        out,
        ExtractSettings(rank=2, conv_rank=3, clamp_quantile=1.0, dtype="fp32"),
    )
    merged = _merged(tmp_path, out)
    for mod, r in ((lin, 2), (conv, 3)):
        err = (merged.unet.get_submodule(mod).weight - tuned.unet.get_submodule(mod).weight).detach()
        sv = np.linalg.svd(deltas[mod].reshape(deltas[mod].shape[0], -1).double().numpy(), compute_uv=False)
        tail = float(np.sqrt((sv[r:] ** 2).sum()))
        assert tail > 0.1
        assert float(err.double().norm()) == pytest.approx(tail, rel=1e-4)


def test_clamp_quantile_clamps_as_kohya(models, tmp_path):
    """kohya's clamp: both factors of the truncated SVD (up = U_r S_r, down = Vh_r) are clipped to
    [-q, q], q the 0.99 quantile of their values; checked against numpy's SVD and quantile."""
    root, planted = models
    out = tmp_path / "c.safetensors"
    extract_lora(str(root / "base"), str(root / "tuned"), out, ExtractSettings(rank=2, dtype="fp32"))
    mod = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    with safe_open(str(out), "pt") as f:
        name = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"
        up, down = (
            f.get_tensor(f"{name}.lora_up.weight").numpy(),
            f.get_tensor(f"{name}.lora_down.weight").numpy(),
        )
        assert not any("in_layers" in k for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    u, s, vh = np.linalg.svd(planted[("unet", mod)].double().numpy(), full_matrices=False)
    ref_up, ref_down = u[:, :2] * s[:2], vh[:2]
    signs = np.sign((ref_down * down).sum(axis=1))  # singular vectors are unique up to sign
    ref_up, ref_down = ref_up * signs, ref_down * signs[:, None]
    hi = np.quantile(np.concatenate([ref_up.ravel(), ref_down.ravel()]), 0.99)
    assert (np.abs(ref_up) > hi).any() or (np.abs(ref_down) > hi).any()  # the clamp bites
    np.testing.assert_allclose(up, np.clip(ref_up, -hi, hi), atol=1e-5)
    np.testing.assert_allclose(down, np.clip(ref_down, -hi, hi), atol=1e-5)


def _bigasp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIGASP), *args], capture_output=True, text=True, env=ENV, timeout=300)


@pytest.mark.slow
def test_cli_extract_generates_the_tuned_image(models, tmp_path):
    """Through the installed executable: the extract loads with `generate --lora` and its image
    equals the tuned model's (pixel difference at most 1/255 from fp32 rounding)."""
    root, _ = models
    lora = tmp_path / "tuned.safetensors"
    r = _bigasp("model", "extract-lora", str(root / "base"), str(root / "tuned"), "--rank", "4",
                "--conv-rank", "4", "--clamp-quantile", "1", "--dtype", "fp32", "--out", str(lora))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "extracted" in r.stdout and lora.is_file()
    common = ["generate", "a red cube", "--size", "64x64", "--steps", "3", "--seed", "5", "--no-progress"]
    b = _bigasp(*common, "--model", str(root / "base"), "--lora", str(lora), "--out", str(tmp_path / "lora"))
    assert b.returncode == 0, b.stderr
    from bigasp.cli import main

    main([*common, "--model", str(root / "tuned"), "--out", str(tmp_path / "tuned")])
    main([*common, "--model", str(root / "base"), "--out", str(tmp_path / "base")])
    from PIL import Image

    def px(d):
        return np.asarray(Image.open(next((tmp_path / d).glob("*.png"))), dtype=np.int16)

    assert np.abs(px("tuned") - px("lora")).max() <= 1
    assert np.abs(px("tuned") - px("base")).max() > 10  # the planted change is visible


@pytest.mark.slow
def test_bad_input_is_refused_in_one_line(models, tmp_path, capsys):
    """Settings are refused before any model loads; another architecture after loading, through
    the executable; nothing is written and an existing file is kept."""
    from bigasp.cli import main

    root, _ = models
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    base, tuned = str(root / "base"), str(root / "tuned")
    cases = [
        (["--rank", "0"], "--rank 0"),
        (["--rank", "-3"], "--rank -3"),
        (["--rank", "4", "--conv-rank", "0"], "--conv-rank 0"),
        (["--rank", "4", "--clamp-quantile", "1.5"], "--clamp-quantile 1.5"),
        (["--rank", "4", "--out", str(taken)], "already exists"),
    ]
    for extra, msg in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["model", "extract-lora", base, tuned, *extra])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and msg in err, err
        assert len(err.strip().splitlines()) == 1, err
    other = tmp_path / "other"
    m = build_preset("tiny", seed=0)
    m.unet = m.unet.__class__.from_config({**dict(m.unet.config), "block_out_channels": [32, 32]})
    save_diffusers_folder(m, other)
    r = _bigasp(
        "model", "extract-lora", base, str(other), "--rank", "4", "--out", str(tmp_path / "o.safetensors")
    )
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "different architectures" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.safetensors").exists()
    assert taken.read_bytes() == b"keep me"


def test_lowrank_svd_matches_the_exact_truncation():
    """--lowrank (torch.svd_lowrank): on a matrix with a decaying spectrum its rank-8 error is within
    1% of the optimal one numpy's SVD gives."""
    from bigasp.models.extract_lora import low_rank_factors

    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 120, generator=g))
    v, _ = torch.linalg.qr(torch.randn(200, 120, generator=g))
    d = (u * 0.7 ** torch.arange(120.0)) @ v.T
    up, down = low_rank_factors(d, 8, clamp_quantile=1.0, lowrank=True)
    sv = np.linalg.svd(d.double().numpy(), compute_uv=False)
    optimal = float(np.sqrt((sv[8:] ** 2).sum()))
    assert float((d - up @ down).norm()) == pytest.approx(optimal, rel=1e-2)


def test_preset_base_and_unchanged_parts_are_left_out(tmp_path):
    """A preset name as BASE is the same model `build_preset` makes; unchanged text encoders and
    layers are left out of the file (kohya's min_diff rule for encoders)."""
    base = build_preset("tiny", seed=0)
    tuned = copy.deepcopy(base)
    mod = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    _plant(tuned.unet.get_submodule(mod), 7)
    save_diffusers_folder(tuned, tmp_path / "tuned")
    out = tmp_path / "p.safetensors"
    _, layers = extract_lora("tiny", str(tmp_path / "tuned"), out, ExtractSettings(rank=2))
    assert layers == 1
    with safe_open(str(out), "pt") as f:
        names = {k.split(".")[0] for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        assert names == {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"}
        assert json.loads(f.metadata()["bigasp_extract"])["skipped"] == ["text_encoder", "text_encoder_2"]
