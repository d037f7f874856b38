"""Learning-rate schedule measured in SAMPLES, not optimizer steps.

bigASP states its warmup in samples (100,000) and its run length in samples (40M, 150M). Counting
in samples keeps a recipe meaning the same thing when the global batch changes (2048 on 8 GPUs,
4096 on 32), which a step-based schedule silently would not.
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["cosine", "constant"]


def lr_multiplier(
    samples: int,
    *,
    warmup_samples: int,
    total_samples: int,
    schedule: Schedule = "cosine",
    min_ratio: float = 0.0,
) -> float:
    """Multiplier on the base lr after `samples` training samples.

    Linear warmup from 0 to 1 over `warmup_samples`, then either constant 1 or a half cosine from 1
    down to `min_ratio` at `total_samples` (held at `min_ratio` beyond it). The trainer evaluates it
    at the sample count *including* the step being taken, so the first step is not wasted at lr 0.
    """
    if samples < warmup_samples:
        return samples / warmup_samples
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; use 'cosine' or 'constant'")
    span = max(total_samples - warmup_samples, 1)
    progress = min(max((samples - warmup_samples) / span, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
