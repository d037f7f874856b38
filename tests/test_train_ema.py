"""EMA of the trained weights: the update equals torch's `AveragedModel` + `get_ema_multi_avg_fn`,
the trainer's average equals that reference replayed over its own checkpoints, a stopped and
resumed run's average is bitwise the uninterrupted one's, and CKPT/ema/ loads as a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bigasp.models.io import load_model
from bigasp.train import checkpoint as ck
from bigasp.train.ema import EMA
from bigasp.train.synthetic import write_synthetic_latent_dataset
from bigasp.train.trainer import train
from train_helpers import ddp_worker, free_port, make_cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_latent_dataset(tmp_path_factory.mktemp("data") / "ds", n=12, seed=0)


def test_ema_update_equals_torch_averaged_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    reference = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ema = EMA(dict(net.named_parameters()), decay=0.9, dtype=torch.float32, device=torch.device("cpu"))
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    for _ in range(6):
        net(torch.randn(4, 5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        reference.update_parameters(net)
        ema.update()
    ref = dict(reference.module.named_parameters())
    for name, value in ema.shadow.items():
        assert torch.equal(value, ref[name]), name
        assert not torch.equal(value, dict(net.named_parameters())[name])  # it does lag the weights


def ema_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return {
        f"{comp}.{k}": v
        for comp, fname in (
            ("unet", "diffusion_pytorch_model.safetensors"),
            ("text_encoder", "model.safetensors"),
        )
        for k, v in load_file(str(ckpt / "ema" / comp / fname)).items()
    }


EMA_CFG = {"enabled": True, "decay": 0.5, "start": 8, "every": 4}


def test_trainer_ema_is_the_reference_over_its_checkpoints_and_resumes_bitwise(tmp_path, data):
    full = train(make_cfg(tmp_path / "full", data, ema=EMA_CFG, checkpoint={"every": 4, "keep_last": 10}))
    ckpts = ck.list_complete_checkpoints(tmp_path / "full")
    assert [ck.read_meta(c)["samples_seen"] for c in ckpts] == [4, 8, 12, 16]
    assert not (ckpts[0] / "ema").exists()  # before ema.start: nothing averaged yet

    # Reference: torch's AveragedModel fed the trained weights at each update (8, 12, 16 samples).
    reference = None
    for c in ckpts[1:]:
        unet = load_model(c / "model", ("unet",)).unet
        if reference is None:
            reference = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(0.5))
        reference.update_parameters(unet)
    got = ema_weights(full.last_checkpoint)
    for name, value in reference.module.named_parameters():
        assert torch.equal(got[f"unet.{name}"], value), name

    # Stopped at 8 samples (after the first update), resumed: bitwise the same average.
    cfg = make_cfg(tmp_path / "cut", data, ema=EMA_CFG)
    first = train(cfg, stop_at=8)
    assert first.samples_seen == 8 and (first.last_checkpoint / "ema").is_dir()
    second = train(cfg, resume="auto")
    assert second.samples_seen == 16
    resumed = ema_weights(second.last_checkpoint)
    assert resumed.keys() == got.keys()
    for k, v in got.items():
        assert torch.equal(resumed[k], v), k

    # The ema/ folder is a complete model: what `bigasp generate --model CKPT/ema` loads.
    model = load_model(second.last_checkpoint / "ema", ("unet", "text_encoder", "text_encoder_2"))
    for name, value in model.unet.named_parameters():
        assert torch.equal(value, got[f"unet.{name}"]), name
    # The frozen encoder is not written twice: ema/ links model/'s file.
    te2 = "text_encoder_2/model.safetensors"
    last = second.last_checkpoint
    assert (last / "ema" / te2).stat().st_ino == (last / "model" / te2).stat().st_ino
    assert torch.equal(
        dict(model.text_encoder_2.named_parameters())["text_model.embeddings.token_embedding.weight"],
        load_file(str(last / "model" / te2))["text_model.embeddings.token_embedding.weight"],
    )


def test_a_damaged_ema_is_named_on_resume(tmp_path, data):
    cfg = make_cfg(tmp_path / "run", data, ema={**EMA_CFG, "start": 0})
    first = train(cfg, stop_at=4)
    (first.last_checkpoint / "ema" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(
        ck.CheckpointError, match=r"ema/unet/diffusion_pytorch_model.safetensors: cannot be read"
    ):
        train(cfg, resume=str(first.last_checkpoint))


def test_ema_on_cpu_in_bf16_keeps_bf16_values(tmp_path, data):
    ema = {**EMA_CFG, "start": 0, "every": 0, "dtype": "bf16", "cpu": True}
    result = train(make_cfg(tmp_path / "bf16", data, ema=ema, train={"max_samples": 8}))
    averaged = {k: v for k, v in ema_weights(result.last_checkpoint).items() if k.startswith("unet.")}
    assert averaged
    for k, v in averaged.items():
        assert v.dtype == torch.float32  # written at the model's dtype...
        assert torch.equal(v, v.bfloat16().float()), k  # ...holding bf16 values exactly


def test_ddp_ema_on_rank_zero_matches_one_process(tmp_path, data):
    ema = {**EMA_CFG, "start": 0, "every": 0}
    one = train(make_cfg(tmp_path / "one", data, ema=ema, train={"max_samples": 8}))
    multi = make_cfg(tmp_path / "two", data, ema=ema, train={"max_samples": 8})
    mp.start_processes(
        ddp_worker, args=(2, free_port(), multi.model_dump_json()), nprocs=2, start_method="fork", join=True
    )
    two = ck.list_complete_checkpoints(multi.run_dir)[-1]
    assert ck.read_meta(two)["world_size"] == 2 and (two / "ema").is_dir()
    a, b = ema_weights(one.last_checkpoint), ema_weights(two)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4  # float summation order only
