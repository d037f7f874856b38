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

# bigASP v2 card: "Supported resolutions (with image count for reference)", WxH: count
CARD_BUCKETS = {
    (832, 1216): 2229287, (1216, 832): 2179902, (832, 1152): 762149, (1152, 896): 430643, (896, 1152): 198820,
    (1344, 768): 185089, (768, 1344): 145989, (1024, 1024): 102374, (1152, 832): 70110, (1280, 768): 58728,
    (768, 1280): 42345, (896, 1088): 40613, (1344, 704): 31708, (704, 1344): 31163, (704, 1472): 27365,
    (960, 1088): 26303, (1088, 896): 24592, (1472, 704): 17991, (960, 1024): 17886, (1088, 960): 17229,
    (1536, 640): 16485, (1024, 960): 15745, (704, 1408): 14188, (1408, 704): 12204, (1600, 640): 4835,
    (1728, 576): 4718, (1664, 576): 2999, (640, 1536): 1827, (640, 1600): 635, (576, 1664): 456, (576, 1728): 335,
}  # fmt: skip


def synthetic_columns(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(heights, widths, caption tokens) per row: sizes drawn from the card's bucket histogram
    (bigASP's real skew: two buckets hold two thirds of the images), tokens 5..259 (1-3 chunks)."""
    rng = np.random.default_rng(seed)
    sizes = np.array(list(CARD_BUCKETS), dtype=np.int32)
    p = np.array(list(CARD_BUCKETS.values()), dtype=np.float64)
    pick = rng.choice(len(sizes), rows, p=p / p.sum())
    tokens = rng.integers(5, 260, rows, dtype=np.int32)
    return sizes[pick, 1], sizes[pick, 0], tokens


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
