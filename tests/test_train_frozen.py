"""Frozen components are written to every checkpoint exactly as they were loaded, whatever
`model.frozen_dtype` they run in (SDXL's fp16 text encoders must not come back bf16-rounded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigasp.models import build_preset
from bigasp.models.io import save_diffusers_folder
from bigasp.train.synthetic import write_synthetic_latent_dataset
from bigasp.train.trainer import configure_model, train
from train_helpers import make_cfg


@pytest.fixture(scope="module")
def fp16_release(tmp_path_factory) -> Path:
    """A tiny model whose weights are exactly fp16 values, like SDXL's published fp16 release."""
    model = build_preset("tiny", ("unet", "text_encoder", "text_encoder_2"), seed=0)
    for name in ("text_encoder", "text_encoder_2"):
        getattr(model, name).to(torch.float16).to(torch.float32)
    return save_diffusers_folder(model, tmp_path_factory.mktemp("src") / "model")


def _te(folder: Path, comp: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / comp / "model.safetensors"))


@pytest.mark.parametrize("frozen_dtype", ["bf16", "fp16"])
def test_frozen_encoders_are_saved_exactly_as_loaded(tmp_path, fp16_release, frozen_dtype):
    torch.set_num_threads(1)
    data = write_synthetic_latent_dataset(tmp_path / "ds", n=12, seed=0)
    cfg = make_cfg(
        tmp_path / "run",
        data,
        model={"source": str(fp16_release), "train_text_encoder": False, "frozen_dtype": frozen_dtype},
        train={"max_samples": 4},
        logging={"every": 4, "batch_log": False, "flops": False},
    )
    saved = train(cfg).last_checkpoint / "model"
    for comp in ("text_encoder", "text_encoder_2"):
        src, out = _te(fp16_release, comp), _te(saved, comp)
        assert src.keys() == out.keys()
        bad = [k for k in src if not torch.equal(src[k].float(), out[k].float())]
        assert not bad, f"{comp} ({frozen_dtype}) changed on save: {bad[:3]}"
        assert {v.dtype for v in out.values()} <= {torch.float16, torch.float32}  # never a bf16 file
    # the UNet did train (the comparison above is not vacuous about saving)
    unet_src = load_file(str(fp16_release / "unet" / "diffusion_pytorch_model.safetensors"))
    unet_out = load_file(str(saved / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(unet_src[k], unet_out[k]) for k in unet_src)


def test_copy_kept_only_when_storage_would_round(tmp_path):
    data = write_synthetic_latent_dataset(tmp_path / "ds", n=12, seed=0)
    fp32_init = build_preset("tiny", ("unet", "text_encoder", "text_encoder_2"), seed=0)
    before = {k: v.clone() for k, v in fp32_init.text_encoder_2.state_dict().items()}
    cfg = make_cfg(tmp_path, data, model={"train_text_encoder": True, "frozen_dtype": "bf16"})
    originals = configure_model(fp32_init, cfg, torch.device("cpu"))
    assert list(originals) == ["text_encoder_2"]  # TE1 trains: fp32 master weights, no copy
    assert all(v.dtype == torch.float32 for v in originals["text_encoder_2"].values())  # fp32 init
    assert all(torch.equal(originals["text_encoder_2"][k], before[k]) for k in before)
    assert next(fp32_init.text_encoder_2.parameters()).dtype == torch.bfloat16  # still runs in bf16
    exact = build_preset("tiny", ("unet", "text_encoder", "text_encoder_2"), seed=0)
    exact.text_encoder_2.to(torch.float16).to(torch.float32)
    cfg16 = make_cfg(tmp_path, data, model={"frozen_dtype": "fp16"})
    assert configure_model(exact, cfg16, torch.device("cpu")) == {}  # fp16 holds fp16 weights exactly
