"""Rank-sharded offline work (encode, annotate): who am I, and one summary for the whole job.

These stages split their work list by rank (`items[rank::world]`) and need no communication
while they run; the ranks meet once, through the launcher's key-value store, to add their
summaries up, so a job launched with torchrun or SLURM `srun` prints one total from rank 0.
"""

from __future__ import annotations

import os
import pickle
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
    """Join the job's meeting (`meeting()` then returns it); False when there is nothing to gather."""
    global _MEETING
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    if _MEETING is None:
        _MEETING = Meeting.join(dist_env()[0], world, stage)
    return True


def meeting() -> Meeting:
    if _MEETING is None:
        raise RuntimeError("meeting() before summary_group()")
    return _MEETING


class Meeting:
    """The ranks of one offline job, talking through the launcher's key-value store.

    The store is the one torch's own `env://` rendezvous makes (torchrun's agent hosts it, or
    rank 0 under a bare `srun`), joined at the start so a wrong MASTER_ADDR fails before hours
    of work. No gloo process group: these stages exchange a few Python objects, never tensors,
    and gloo's worker threads, if still alive at interpreter exit, abort the process ("terminate
    called without an active exception") after the work is done, failing a finished job.

    Every rank makes the same calls in the same order (as with torch's collectives); each call
    gets its own keys from a running count. A wait lasts up to `TIMEOUT`: ranks of a long encode
    can end hours apart on unevenly sized shares, and by then every rank's work is committed.
    """

    def __init__(self, store: Any, rank: int, world: int, prefix: str):
        self.store, self.rank, self.world, self.prefix = store, rank, world, prefix
        self._calls = 0

    @classmethod
    def join(cls, rank: int, world: int, stage: str) -> Meeting:
        from torch.distributed import rendezvous

        store, _, _ = next(rendezvous(f"env://?rank={rank}&world_size={world}", timeout=TIMEOUT))
        return cls(store, rank, world, f"bigasp/{stage}")

    def _keys(self, name: str) -> str:
        self._calls += 1
        return f"{self.prefix}/{self._calls}-{name}"

    def all_gather(self, obj: Any, name: str = "all") -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        base = self._keys(name)
        self.store.set(f"{base}/{self.rank}", pickle.dumps(obj))
        keys = [f"{base}/{r}" for r in range(self.world)]
        self.store.wait(keys)
        return [pickle.loads(self.store.get(k)) for k in keys]

    def broadcast(self, obj: Any, name: str = "bcast") -> Any:
        """Rank 0's `obj` on every rank."""
        key = self._keys(name)
        if self.rank == 0:
            self.store.set(key, pickle.dumps(obj))
            return obj
        self.store.wait([key])
        return pickle.loads(self.store.get(key))

    def scatter(self, objs: list[Any] | None, name: str = "scatter") -> Any:
        """Rank r gets `objs[r]` of rank 0's list (read once, then dropped from the store)."""
        base = self._keys(name)
        if self.rank == 0:
            assert objs is not None and len(objs) == self.world
            for r in range(1, self.world):
                self.store.set(f"{base}/{r}", pickle.dumps(objs[r]))
            return objs[0]
        key = f"{base}/{self.rank}"
        self.store.wait([key])
        obj = pickle.loads(self.store.get(key))
        self.store.delete_key(key)
        return obj

    def gather(self, obj: Any, name: str = "gather") -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere; read once, then dropped from the store)."""
        base = self._keys(name)
        if self.rank != 0:
            self.store.set(f"{base}/{self.rank}", pickle.dumps(obj))
            return None
        out = [obj]
        for r in range(1, self.world):
            key = f"{base}/{r}"
            self.store.wait([key])
            out.append(pickle.loads(self.store.get(key)))
            self.store.delete_key(key)
        return out

    def barrier(self, name: str = "barrier") -> None:
        self.all_gather(None, name)

    def leave(self) -> None:
        """The last call of the job: rank 0 returns only after every rank got here, since under
        `srun` the store lives in rank 0's process and must outlive every rank's last read."""
        global _MEETING
        base = self._keys("leave")
        self.store.set(f"{base}/{self.rank}", b"1")
        if self.rank == 0:
            self.store.wait([f"{base}/{r}" for r in range(self.world)])
        if _MEETING is self:
            _MEETING = None


_MEETING: Meeting | None = None
TIMEOUT = timedelta(hours=24)


class Summary(Protocol):
    rank: int
    world_size: int

    def merge(self, other) -> None: ...


S = TypeVar("S", bound=Summary)


def gather_summary(summary: S) -> S:
    """Every rank's summary added up (on every rank); the job's last meeting."""
    m = meeting()
    total = type(summary)(rank=summary.rank, world_size=summary.world_size)
    for part in m.all_gather(summary, "summary"):
        total.merge(part)
    m.leave()
    return total
