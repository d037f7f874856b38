"""FSDP2 through the real trainer: 2 gloo CPU processes, tiny preset, TE1 trained.

FSDP2 reaches the weights of DDP (same global batches, fp32), and an FSDP2 run preempted at a
checkpoint and resumed ends bitwise where the uninterrupted FSDP2 run ends (full, unsharded
model and optimizer state in the checkpoint); that checkpoint also resumes under DDP. Gradient accumulation (2 micro-steps) and
validation with unequal per-rank batch counts are on the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from bigasp.train import checkpoint as ck
from bigasp.train.config import RunConfig
from bigasp.train.distributed import shutdown
from bigasp.train.synthetic import write_synthetic_latent_dataset
from bigasp.train.tracking import read_metrics
from bigasp.train.trainer import train
from train_helpers import free_port, make_cfg, weights, weights_at_init

pytestmark = pytest.mark.slow


def _worker(rank: int, world: int, port: int, cfg_json: str, resume: str | None, stop_at: int | None) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        train(RunConfig.model_validate_json(cfg_json), resume=resume, stop_at=stop_at)
    finally:
        shutdown()


def _run(cfg: RunConfig, *, resume: str | None = None, stop_at: int | None = None) -> Path:
    mp.start_processes(
        _worker,
        args=(2, free_port(), cfg.model_dump_json(), resume, stop_at),
        nprocs=2,
        start_method="fork",
        join=True,
    )
    return ck.list_complete_checkpoints(cfg.run_dir)[-1]


def _metric(ckpt: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(ckpt.parents[1]) if key in m]


def _optimizer(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "state" / "optimizer.safetensors"))


def test_fsdp2_matches_ddp_and_resumes_exactly(tmp_path):
    data = write_synthetic_latent_dataset(tmp_path / "ds", n=24, seed=2)
    init = weights_at_init()  # also imports diffusers/transformers once, before the forks
    common = dict(
        # global batch 8 = device batch 2 x accumulation 2 x 2 ranks; 2 optimizer steps
        train={"batch_size": 8, "max_samples": 16, "warmup_samples": 8},
        # validation capped at 10% of 24 = 2 rows = one batch, on rank 0: rank 1 runs a filler forward
        data={"validation_size": 3},
        validation={"every": 1000, "at_start": True, "stable": False},
        checkpoint={"every": 0},
        logging={"every": 8, "batch_log": False, "flops": False},
    )
    ddp = _run(make_cfg(tmp_path / "ddp", data, **common))
    fsdp_train = {**common["train"], "parallelism": "fsdp2"}
    fsdp_cfg = make_cfg(tmp_path / "fsdp", data, **{**common, "train": fsdp_train})
    fsdp = _run(fsdp_cfg)
    assert ck.read_meta(fsdp)["samples_seen"] == 16

    a, b = weights(ddp), weights(fsdp)
    assert a.keys() == b.keys()
    # Same math, different float summation (reduce-scatter of shards vs bucketed all-reduce);
    # AdamW normalises per element, so a ~1e-7 gradient difference shows as at most a small
    # fraction of one lr=1e-3 step.
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    close = sum(int(((a[k] - b[k]).abs() <= 1e-6).sum()) for k in a) / sum(a[k].numel() for k in a)
    assert worst < 1e-4 and close >= 0.9999, (worst, close)
    assert max(float((a[k] - init[k]).abs().max()) for k in init) > 10 * worst  # the steps really moved
    # AdamW steps hide the gradient's scale; the logged loss and pre-clip gradient norm of every step
    # show a missing `/ accumulation` or a sum instead of a mean across ranks.
    for key in ("train/grad_norm", "train/loss"):
        da, fa = _metric(ddp, key), _metric(fsdp, key)
        assert len(da) == 2 and da == pytest.approx(fa, rel=1e-6, abs=0), (key, da, fa)
    oa, ob = _optimizer(ddp), _optimizer(fsdp)
    assert oa.keys() == ob.keys() and any(k.startswith("state.unet.conv_in.weight.") for k in oa)
    assert all(v.dtype == torch.float32 for v in b.values())  # unsharded fp32 masters in model/

    # preempt-style slice at 8 samples, then resume: bitwise the uninterrupted FSDP2 run
    cut_cfg = make_cfg(tmp_path / "cut", data, **{**common, "train": fsdp_train})
    first = _run(cut_cfg, stop_at=8)
    assert ck.read_meta(first)["samples_seen"] == 8
    resumed = _run(cut_cfg, resume="auto")
    c = weights(resumed)
    assert all(torch.equal(b[k], c[k]) for k in b), [k for k in b if not torch.equal(b[k], c[k])][:5]
    oc = _optimizer(resumed)
    assert all(torch.equal(ob[k], oc[k]) for k in ob)

    # the same unsharded, FQN-keyed state resumes under DDP: lands on the DDP run's weights
    swap = _run(make_cfg(tmp_path / "swap", data, **common), resume=str(first))
    d = weights(swap)
    worst = max(float((a[k] - d[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst
