"""Process-group setup from torchrun or SLURM environment variables; world size 1 = plain process.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under `srun` without
torchrun, SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are mapped onto the same names (MASTER_ADDR
must be exported by the batch script, see docs/training.md). No home-made cluster code: after
this, everything is `torch.distributed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bigasp.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def read_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, else SLURM, else a single process."""
    if _env_int("WORLD_SIZE") is not None:
        return _env_int("RANK") or 0, _env_int("WORLD_SIZE") or 1, _env_int("LOCAL_RANK") or 0
    if _env_int("SLURM_NTASKS") is not None and _env_int("SLURM_PROCID") is not None:
        world = _env_int("SLURM_NTASKS") or 1
        if world > 1 and not os.environ.get("MASTER_ADDR"):
            raise ConfigError(
                "running under SLURM with several tasks but MASTER_ADDR is not set; export it in the "
                "batch script, e.g. MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)"
            )
        os.environ.setdefault("MASTER_PORT", "29500")
        rank, local = _env_int("SLURM_PROCID") or 0, _env_int("SLURM_LOCALID") or 0
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        return rank, world, local
    return 0, 1, 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the default process group (nccl on CUDA, gloo on CPU) when world size > 1.

    `device`: "auto" (CUDA if available), "cuda" or "cpu". Each rank uses cuda:LOCAL_RANK.
    """
    from bigasp.devices import resolve

    rank, world, local = read_env()
    dev = resolve(device, local_rank=local, setting="train.device")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op for a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_objects(obj: object) -> list[object]:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj: object, src: int = 0) -> object:
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
