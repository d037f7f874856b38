"""Offline stages' end-of-job summary: ranks meet through the launcher's store, with no gloo group."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

_RANK = """
import json, sys, threading
from dataclasses import dataclass, field
from bigasp import workshare

@dataclass
class Count:
    rank: int = 0
    world_size: int = 1
    done: int = 0
    ranks: list = field(default_factory=list)

    def merge(self, other):
        self.done += other.done
        self.ranks += other.ranks

rank, world, _ = workshare.dist_env()
assert workshare.summary_group(world, "test")
m = workshare.meeting()
rule = m.broadcast({"from": rank})  # rank 0's value everywhere
share = m.scatter([f"share-{r}" for r in range(world)] if rank == 0 else None)
got = m.gather((rank, share))  # on rank 0 only
m.barrier()
mine = Count(rank=rank, world_size=world, done=10 * (rank + 1), ranks=[rank])
total = workshare.gather_summary(mine)
alive = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
print(json.dumps({"rank": rank, "done": total.done, "ranks": sorted(total.ranks), "threads": alive,
                  "rule": rule, "share": share, "got": got}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_srun_ranks_meet_through_the_store_and_rank_0_outlives_the_readers():
    """Three processes launched as `srun` would (SLURM_* variables only, rank 0 hosts the store):
    broadcast, scatter, gather and the summary give each rank what torch's collectives would, and
    every process exits 0 (no gloo threads left to abort, rank 0 outlives the last read)."""
    port = _free_port()
    procs = []
    for rank in (2, 0, 1):  # rank 0 neither first nor last to start
        env = {
            **os.environ,
            "PYTHONPATH": str(SRC),
            "OMP_NUM_THREADS": "1",
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": "3",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_USE_AGENT_STORE"):
            env.pop(k, None)
        procs.append(
            subprocess.Popen([sys.executable, "-c", _RANK], env=env, stdout=subprocess.PIPE, text=True)
        )
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["rank"] for o in outs) == [0, 1, 2]
    assert all(o["done"] == 60 and o["ranks"] == [0, 1, 2] for o in outs), outs
    assert all(o["threads"] == [] for o in outs), outs  # nothing left running into interpreter exit
    by_rank = {o["rank"]: o for o in outs}
    assert all(o["rule"] == {"from": 0} and o["share"] == f"share-{r}" for r, o in by_rank.items()), outs
    assert by_rank[0]["got"] == [[0, "share-0"], [1, "share-1"], [2, "share-2"]]
    assert by_rank[1]["got"] is None and by_rank[2]["got"] is None


def test_one_process_has_nothing_to_gather(monkeypatch):
    from bigasp import workshare

    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    assert workshare.dist_env() == (0, 1, 0)
    assert workshare.summary_group(1, "test") is False
