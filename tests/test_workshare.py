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
mine = Count(rank=rank, world_size=world, done=10 * (rank + 1), ranks=[rank])
total = workshare.gather_summary(mine)
alive = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
print(json.dumps({"rank": rank, "done": total.done, "ranks": sorted(total.ranks), "threads": alive}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_srun_ranks_add_their_summaries_up_and_rank_0_outlives_the_readers():
    """Three processes launched as `srun` would (SLURM_* variables only, rank 0 hosts the store):
    every rank gets the same total, and every process exits 0 (no gloo threads left to abort)."""
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


def test_one_process_has_nothing_to_gather(monkeypatch):
    from bigasp import workshare

    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    assert workshare.dist_env() == (0, 1, 0)
    assert workshare.summary_group(1, "test") is False
