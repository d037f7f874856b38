"""Rank-sharded offline work (encode, annotate): who am I, and one summary for the whole job.

These stages split their work list by rank (`items[rank::world]`) and need no communication
while they run; the ranks meet once, through the launcher's key-value store, to add their
summaries up, so a job launched with torchrun or SLURM `srun` prints one total from rank 0.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, or SLURM when launched by `srun` alone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def summary_group(world: int, stage: str) -> bool:
    """Connect this rank to the job's key-value store; False when there is nothing to gather.

    The store is the one torch's own `env://` rendezvous makes (torchrun's agent hosts it, or
    rank 0 under a bare `srun`), joined now so a wrong MASTER_ADDR fails before hours of work.
    No gloo process group: these stages never exchange tensors, and gloo's worker threads, if
    still alive at interpreter exit, abort the process ("terminate called without an active
    exception") after the work is done, failing a finished job.
    """
    global _GROUP
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    if _GROUP is None:
        from torch.distributed import rendezvous

        rank = dist_env()[0]
        url = f"env://?rank={rank}&world_size={world}"
        store, _, _ = next(rendezvous(url, timeout=GATHER_TIMEOUT))
        _GROUP = _Group(store, rank, world, f"bigasp/{stage}")
    return True


@dataclass
class _Group:
    store: Any  # torch.distributed.Store
    rank: int
    world: int
    prefix: str


_GROUP: _Group | None = None
# How long the first rank to finish waits for the last: ranks of a long encode can end hours
# apart on unevenly sized shares, and by then every rank's work is already committed.
GATHER_TIMEOUT = timedelta(hours=24)


class Summary(Protocol):
    rank: int
    world_size: int

    def merge(self, other) -> None: ...


S = TypeVar("S", bound=Summary)


def gather_summary(summary: S) -> S:
    """Every rank's summary added up (on every rank), through the store; leaves the group.

    Rank 0 returns last: under `srun` the store lives in its process, so it waits until every
    rank has read the summaries before it may exit.
    """
    global _GROUP
    g = _GROUP
    if g is None:
        raise RuntimeError("gather_summary before summary_group")
    g.store.set(f"{g.prefix}/summary/{g.rank}", pickle.dumps(summary))
    keys = [f"{g.prefix}/summary/{r}" for r in range(g.world)]
    g.store.wait(keys)
    total = type(summary)(rank=summary.rank, world_size=summary.world_size)
    for key in keys:
        total.merge(pickle.loads(g.store.get(key)))
    g.store.set(f"{g.prefix}/read/{g.rank}", b"1")
    if g.rank == 0:
        g.store.wait([f"{g.prefix}/read/{r}" for r in range(g.world)])
    _GROUP = None
    return total
