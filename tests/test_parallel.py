"""FSDP2 (fully_shard per UNet block) trains to the same weights as DDP: 2 CPU ranks over gloo."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LR = 1e-3
STEPS = 2


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)  # each rank sees different data
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randint(0, 1000, (2,), generator=g),
        torch.randn(2, 77, 64, generator=g),
        {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)},
    )


def _train(model, opt, rank: int) -> None:
    for step in range(STEPS):
        x, t, ctx, added = _batch(rank, step)
        loss = model(x, t, ctx, added_cond_kwargs=added).sample.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from bigasp.models import build_preset
        from bigasp.train.parallel import apply_fsdp2, full_state_dict, load_full_state_dict, wrap_ddp

        def fresh():
            return build_preset("tiny", components=("unet",), seed=0).unet.train()

        init = {k: v.clone() for k, v in fresh().state_dict().items()}
        ddp = wrap_ddp(fresh(), torch.device("cpu"))
        _train(ddp, torch.optim.AdamW(ddp.parameters(), lr=LR), rank)
        fsdp = apply_fsdp2(fresh(), param_dtype=None, reduce_dtype=torch.float32)
        _train(fsdp, torch.optim.AdamW(fsdp.parameters(), lr=LR), rank)
        bf16 = apply_fsdp2(fresh(), param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        _train(bf16, torch.optim.AdamW(bf16.parameters(), lr=LR), rank)
        master_dtypes = {p.dtype for p in bf16.parameters()}

        # Resume: a full state dict loads into a fresh sharded model and gathers back unchanged.
        sd_fsdp = full_state_dict(fsdp)
        resumed = apply_fsdp2(fresh(), param_dtype=None)
        load_full_state_dict(resumed, sd_fsdp if rank == 0 else {})  # rank 0 read the checkpoint
        sd_resumed = full_state_dict(resumed)
        sd_ddp, sd_bf16 = full_state_dict(ddp), full_state_dict(bf16)
        if rank == 0:
            torch.save(
                {
                    "init": init,
                    "ddp": sd_ddp,
                    "fsdp": sd_fsdp,
                    "bf16": sd_bf16,
                    "resumed": sd_resumed,
                    "master_dtypes": [str(d) for d in master_dtypes],
                },
                out_file,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_matches_ddp_on_two_gloo_ranks(tmp_path):
    out = tmp_path / "weights.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "pg"), str(out)), nprocs=2, join=True)
    r = torch.load(out, weights_only=True)
    init, ddp, fsdp, bf16 = r["init"], r["ddp"], r["fsdp"], r["bf16"]
    assert ddp.keys() == fsdp.keys() == init.keys()
    moved = max((ddp[k] - init[k]).abs().max().item() for k in init)
    assert moved > 0.5 * LR  # the steps really changed the weights (Adam moves ~lr per step)
    diff = max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp)
    assert diff < 2e-5, f"FSDP2 (fp32) and DDP weights differ by {diff}"
    # bf16 compute params: masters stay fp32 and land within Adam's per-step bound of DDP.
    assert r["master_dtypes"] == ["torch.float32"]
    assert all(v.dtype == torch.float32 for v in bf16.values())
    diff_bf16 = max((ddp[k] - bf16[k]).abs().max().item() for k in ddp)
    assert 0 < diff_bf16 <= 2 * LR * STEPS + 1e-6
    assert all(torch.equal(fsdp[k], r["resumed"][k]) for k in fsdp)
