"""`bigasp bench plan`: aspect/chunk buckets + one epoch's batch order for an N-row manifest.

Synthetic per-row columns (bucket sizes drawn from the SDXL bucket set, caption token
estimates from a log-normal around bigASP's caption lengths), then the training-data
engineer's `plan_for_rank` — the exact work every rank does before its first batch. Time and
the process's peak RSS over the call (bigASP scale: 13M rows; target < 60 s, < 4 GB).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bigasp.bench.common import BenchResult, PeakMemory, machine_info


def synthetic_columns(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from bigasp.buckets import BucketConfig

    rng = np.random.default_rng(seed)
    buckets = BucketConfig().buckets()
    hw = np.array([(b.height, b.width) for b in buckets], dtype=np.int32)
    pick = rng.integers(0, len(hw), rows)
    tokens = np.clip(rng.lognormal(np.log(90), 0.5, rows), 1, 400).astype(np.int32)
    return hw[pick, 0], hw[pick, 1], tokens


def run_plan_bench(*, rows: int, device_batch: int, world_size: int, seed: int, command: str) -> BenchResult:
    from bigasp.train.sampler import plan_for_rank

    t0 = time.perf_counter()
    heights, widths, tokens = synthetic_columns(rows, seed)
    columns_s = time.perf_counter() - t0
    with PeakMemory(torch.device("cpu")) as mem:
        t0 = time.perf_counter()
        buckets, plan, positions = plan_for_rank(
            heights, widths, tokens, seed=seed, epoch=0, device_batch_size=device_batch, world_size=world_size
        )
        plan_s = time.perf_counter() - t0
    metrics = {
        "seconds": plan_s,
        "rows_per_s": rows / plan_s,
        "buckets": int(buckets.n_buckets),
        "batches": int(plan.n_batches),
        "rank0_batches": len(positions),
        "columns_s": columns_s,
        "ratio_to_target_time": plan_s / 60.0,
        **mem.result(),
    }
    return BenchResult(
        bench="plan",
        config={"rows": rows, "device_batch": device_batch, "world_size": world_size, "seed": seed},
        metrics=metrics,
        headline=[("seconds", "s"), ("peak_rss_gib", "GiB peak RSS"), ("buckets", "buckets")],
        command=command,
        machine=machine_info(torch.device("cpu")),
    )
