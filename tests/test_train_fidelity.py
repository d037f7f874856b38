"""The trainer against what bigASP did, on the tiny preset on CPU: SDXL size conditioning on a
non-square bucket reaches the UNet as (height, width); fp16 runs resume with the GradScaler's state;
only the first N text-encoder layers train when asked; the stable loss is min-SNR weighted by default."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from torch.nn.modules.module import register_module_forward_pre_hook

from bigasp.errors import ConfigError
from bigasp.store import LatentDataset
from bigasp.train.data import split_dataset
from bigasp.train.synthetic import write_synthetic_latent_dataset
from bigasp.train.tracking import read_metrics
from bigasp.train.trainer import train
from train_helpers import make_cfg, weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_latent_dataset(tmp_path_factory.mktemp("data") / "ds", n=12, seed=0)


def test_non_square_size_conditioning_reaches_the_unet_as_height_width(tmp_path, caplog):
    """Bucket 64x32 (h x w), original 300x100, crop top 7 / left 1: every UNet call (training and
    validation) gets time_ids (300, 100, 7, 1, 64, 32), SDXL's (orig_h, orig_w, top, left, h, w);
    any H/W swap on the way gives another tensor. The same run checks the stable loss is named."""
    ds = write_synthetic_latent_dataset(
        tmp_path / "ds", n=12, height=64, width=32, original=(300, 100), crop=(7, 1)
    )
    cfg = make_cfg(
        tmp_path / "run",
        ds,
        train={"max_samples": 8, "min_snr_gamma": 5.0},
        validation={"every": 1000, "at_start": True, "stable": True},
        logging={"every": 4, "batch_log": False, "flops": False},
    )
    seen: list[torch.Tensor] = []
    probes = []

    def capture(_module, _args, kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].detach().clone())

    def attach(module, _args):  # hook the real UNet the trainer builds, on its first call
        if isinstance(module, UNet2DConditionModel) and not probes:
            probes.append(module.register_forward_pre_hook(capture, with_kwargs=True))

    handle = register_module_forward_pre_hook(attach)
    try:
        with caplog.at_level(logging.INFO, logger="bigasp.train"):
            train(cfg)
    finally:
        handle.remove()
        for p in probes:
            p.remove()
    assert len(seen) >= 4  # validation + stable at start, then 2 steps x 2 micro-batches
    expected = torch.tensor([300.0, 100.0, 7.0, 1.0, 64.0, 32.0])
    for t in seen:
        assert t.shape[1] == 6 and torch.equal(t, expected.expand_as(t)), t

    # the stable loss is min-SNR weighted by default (bigASP's train.py) and says so; plain beside it
    first = read_metrics(cfg.run_dir)[0]
    assert first["stable/loss"] != first["stable/loss_plain"] and "val/loss_plain" not in first
    assert any("stable/loss (min-SNR-5 weighted)" in r.message for r in caplog.records)
    assert any("val/loss (plain MSE)" in r.message for r in caplog.records)


def test_fp16_resume_restores_the_grad_scaler_exactly(tmp_path, data):
    """fp16 with growth every 3 steps: an uninterrupted 4-step run doubles the scale after step 3.
    Stopped after step 2 and resumed, the run must carry scale and growth tracker (2) over, grow at
    the same step and end bitwise where the uninterrupted run ends."""
    common = dict(
        train={"precision": "fp16", "max_samples": 16, "grad_scaler_growth_interval": 3},
        logging={"every": 4, "batch_log": False, "flops": False},
    )
    full = train(make_cfg(tmp_path / "a", data, **common))
    cut = make_cfg(tmp_path / "b", data, **common)
    first = train(cut, stop_at=8)
    assert first.samples_seen == 8
    state = json.loads((first.last_checkpoint / "state" / "trainer.json").read_text())
    assert state["scaler"]["_growth_tracker"] == 2 and state["scaler"]["scale"] == 65536.0
    # the checkpoint keeps the id-hash split cutoff (a grown dataset keeps every old image's side)
    split = split_dataset(LatentDataset(str(data)), cut.data, seed=cut.data.seed)
    assert state["split_threshold"] == split.threshold >= 0
    second = train(cut, resume="auto")
    assert second.samples_seen == 16

    scales = lambda run: [m["train/loss_scale"] for m in read_metrics(run) if "train/loss_scale" in m]  # noqa: E731
    assert scales(tmp_path / "a") == scales(tmp_path / "b") == [65536.0, 65536.0, 131072.0, 131072.0]
    end_a = json.loads((full.last_checkpoint / "state" / "trainer.json").read_text())["scaler"]
    end_b = json.loads((second.last_checkpoint / "state" / "trainer.json").read_text())["scaler"]
    assert end_a == end_b and end_a["_growth_tracker"] == 1
    a, b = weights(full.last_checkpoint), weights(second.last_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    opt_a = load_file(str(full.last_checkpoint / "state" / "optimizer.safetensors"))
    opt_b = load_file(str(second.last_checkpoint / "state" / "optimizer.safetensors"))
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)


def _encoder_weights(ckpt, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model" / name / "model.safetensors"))


def test_only_the_first_text_encoder_layers_train(tmp_path, data):
    """model.text_encoder_layers = 1 and text_encoder_2_layers = 2: after real steps only those
    layers moved; embeddings, later layers, norms and TE2's projection are bitwise as initialised."""
    from bigasp.models import build_preset
    from bigasp.train.denoiser import Denoiser
    from bigasp.train.trainer import configure_model

    cfg = make_cfg(
        tmp_path / "run",
        data,
        model={
            "train_text_encoder": True,
            "text_encoder_layers": 1,
            "train_text_encoder_2": True,
            "text_encoder_2_layers": 2,
        },
        train={"max_samples": 8},
        logging={"every": 4, "batch_log": False, "flops": False},
    )
    # gradients: a real backward through the configured model reaches exactly the chosen layers
    model = build_preset("tiny", ("unet", "text_encoder", "text_encoder_2"), seed=0)
    configure_model(model, cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 400, (2, 1, 77), generator=g)
    out = Denoiser(model.unet, model.text_encoder, model.text_encoder_2)(
        torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0]), ids, ids, torch.ones(2, 6)
    )
    out.pow(2).mean().backward()
    for name, n in (("text_encoder", 1), ("text_encoder_2", 2)):
        params = dict(getattr(model, name).named_parameters())
        trained_names = {k for k in params if any(f"encoder.layers.{i}." in k for i in range(n))}
        assert trained_names and {k for k, p in params.items() if p.requires_grad} == trained_names
        assert all(params[k].grad is not None and params[k].grad.abs().sum() > 0 for k in trained_names)
        assert all(p.grad is None for k, p in params.items() if k not in trained_names)

    too_many = make_cfg(tmp_path / "x", data, model={"train_text_encoder": True, "text_encoder_layers": 9})
    with pytest.raises(ConfigError, match=r"model\.text_encoder_layers = 9 but the encoder has 3 layers"):
        configure_model(
            build_preset("tiny", ("unet", "text_encoder", "text_encoder_2")), too_many, torch.device("cpu")
        )

    # the same components as the trainer builds, so the random init is the same
    init = build_preset("tiny", ("unet", "text_encoder", "text_encoder_2"), seed=0)
    ckpt = train(cfg).last_checkpoint
    for name, n in (("text_encoder", 1), ("text_encoder_2", 2)):
        before = getattr(init, name).state_dict()
        after = _encoder_weights(ckpt, name)
        moved = {k for k in after if not torch.equal(after[k], before[k])}
        in_layers = {k for k in after if any(f"encoder.layers.{i}." in k for i in range(n))}
        assert moved and moved <= in_layers, sorted(moved - in_layers)[:5]
        assert any("embeddings" in k for k in after) and not any("embeddings" in k for k in moved)
