"""Shared helpers of the trainer tests (a plain module, not a test file): the tiny-run config,
checkpoint weight readers and a free TCP port for gloo rendezvous."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from safetensors.torch import load_file

from bigasp.config import validate
from bigasp.train.config import RunConfig


def make_cfg(run_dir: Path, dataset: Path, **sections) -> RunConfig:
    raw = {
        "run_dir": str(run_dir),
        "model": {"source": "tiny", "save_vae": False, "train_text_encoder": True},
        "data": {
            "dataset": str(dataset),
            "seed": 3,
            "device_batch_size": 2,
            "num_workers": 0,
            "validation_size": 4,
            "stable_size": 4,
        },
        "train": {
            "objective": "eps",
            "batch_size": 4,
            "max_samples": 16,
            "lr": 1e-3,
            "warmup_samples": 8,
            "precision": "fp32",
            "device": "cpu",
        },
        "validation": {"every": 0},
        "checkpoint": {"every": 0, "keep_last": 5},
        "logging": {"every": 4, "batch_log": True, "flops": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return validate(RunConfig, raw)


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for comp, fname in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        out.update({f"{comp}.{k}": v for k, v in load_file(str(ckpt / "model" / comp / fname)).items()})
    return out


def weights_at_init() -> dict[str, torch.Tensor]:
    from bigasp.models import build_preset

    m = build_preset("tiny", ("unet", "text_encoder"), seed=0)
    out = {f"unet.{k}": v for k, v in m.unet.state_dict().items()}
    out.update({f"text_encoder.{k}": v for k, v in m.text_encoder.state_dict().items()})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_planned_rows(loader, n: int):
    """Rows of the first `n` planned training samples (rank 0 of 1), over as many epochs as needed."""
    import numpy as np

    rows: list = []
    epoch = 0
    while sum(len(r) for r in rows) < n:
        plan = loader.plan(epoch)
        rows.append(plan.trained_rows(plan.n_batches))
        epoch += 1
    return np.concatenate(rows)[:n]


def ddp_worker(rank: int, world: int, port: int, cfg_json: str) -> None:
    """One torchrun-style rank: the environment variables torchrun sets, then the real trainer.
    Start with `torch.multiprocessing.start_processes(ddp_worker, args=(world, port, cfg_json),
    nprocs=world, start_method="fork")`."""
    import os

    from bigasp.train.config import RunConfig
    from bigasp.train.distributed import shutdown
    from bigasp.train.trainer import train

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        train(RunConfig.model_validate_json(cfg_json))
    finally:
        shutdown()
