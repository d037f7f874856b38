"""Rank-sharded offline work (encode, annotate): who am I, and one summary for the whole job.

These stages split their work list by rank (`items[rank::world]`) and need no communication
while they run; a gloo group exists only to add the per-rank summaries up at the end, so a
job launched with torchrun or SLURM `srun` prints one total from rank 0.
"""

from __future__ import annotations

import os
from typing import Protocol, TypeVar


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, or SLURM when launched by `srun` alone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def summary_group(world: int, timeout_s: float | None = None) -> bool:
    """Start the gloo group that `gather_summary` uses; False when there is nothing to gather.

    `timeout_s`: how long a collective waits for the slowest rank (torch's default: 30 minutes).
    If the stage fails before `gather_summary` ends the group, an exit handler ends it while the
    interpreter is still whole: gloo threads left running into interpreter teardown abort the
    process ("terminate called without an active exception") and hide the real error.
    """
    import atexit

    import torch.distributed as dist

    if world <= 1 or "MASTER_ADDR" not in os.environ or not dist.is_available():
        return False
    if not dist.is_initialized():
        if timeout_s is None:
            dist.init_process_group("gloo")
        else:  # ranks that finish early wait this long for the slowest at the final gather
            import datetime

            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
        atexit.register(_end_group)
    return True


def _end_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Summary(Protocol):
    rank: int
    world_size: int

    def merge(self, other) -> None: ...


S = TypeVar("S", bound=Summary)


def gather_summary(summary: S) -> S:
    """Every rank's summary added up (on every rank); ends the group."""
    import torch.distributed as dist

    parts: list[S | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, summary)
    total = type(summary)(rank=summary.rank, world_size=summary.world_size)
    for p in parts:
        if p is not None:
            total.merge(p)
    dist.barrier()
    dist.destroy_process_group()
    return total
