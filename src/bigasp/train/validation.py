"""Validation loss and the stable training loss, comparable across runs, seeds of noise and world sizes.

SD training loss is dominated by which timesteps and noise a batch happened to draw. bigASP
therefore evaluated a held-out set with a fixed seed and the plain, unweighted loss, and a fixed
slice of the training set (the "stable" loss) the same way but, in its train.py, with the
training weighting (min-SNR); `validation.stable_loss` picks. Here each evaluated image gets

* noise keyed by (run seed, set name, row index): identical on every evaluation, any rank;
* a fixed *stratified* time: the set's images are spread over the centres of `count` equal
  strata of t in [0, 1] by a seeded permutation, so every evaluation covers t uniformly;

and per-sample MSE is summed and counted per t-bin, then all-reduced, so the number does not
depend on how the images were split over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import numpy as np
import torch

from bigasp.train.data import Batch
from bigasp.train.denoiser import time_ids_from
from bigasp.train.distributed import all_reduce_sum
from bigasp.train.objectives import Objective, keyed_generator, stratified_t


def strata(indices: np.ndarray, *, seed: int, name: str) -> dict[int, int]:
    """row index -> stratum in [0, len(indices)), a fixed seeded permutation."""
    perm = torch.randperm(len(indices), generator=keyed_generator(seed, "strata", name)).tolist()
    return {int(row): perm[j] for j, row in enumerate(indices)}


@torch.no_grad()
def evaluate(
    forward: Callable[..., torch.Tensor],
    objective: Objective,
    batches: Iterable[Batch],
    *,
    indices: np.ndarray,
    name: str,
    seed: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    t_bins: int = 10,
    filler: Iterable[Batch] = (),
    weighted: bool = False,
) -> dict[str, float]:
    """Loss of the set `name` plus per-t-bin losses, summed over all ranks.

    Plain (unweighted) MSE unless `weighted`: then the training weighting (min-SNR for eps) as
    bigASP computed its stable train loss, and `{name}/loss_plain` is reported beside it.

    `forward(x_t, timesteps, te1_ids, te2_ids, time_ids)` is the (unwrapped) denoiser.
    `filler`: batches run through `forward` and discarded, so that under FSDP2 (where every
    forward is a collective) a rank with fewer evaluation batches keeps pace with the others.
    """
    for batch in filler:
        batch = batch.to(device)
        with autocast():
            forward(
                batch.latents.float(),
                torch.zeros(batch.latents.shape[0], device=device),
                batch.te1_ids,
                batch.te2_ids,
                time_ids_from(batch.original_size, batch.crop, batch.target_size),
            )
    stratum = strata(indices, seed=seed, name=name)
    count = len(indices)
    sums = torch.zeros(3 + 2 * t_bins, dtype=torch.float64, device=device)  # [.., plain sum]
    for batch in batches:
        rows = batch.indices.tolist()
        batch = batch.to(device)
        shape = tuple(batch.latents.shape[1:])
        noise = torch.stack(
            [
                torch.randn(shape, generator=keyed_generator(seed, "eval", name, r), dtype=torch.float32)
                for r in rows
            ]
        )
        t = torch.tensor([stratified_t(stratum[r], count) for r in rows], dtype=torch.float64)
        prep = objective.prepare(batch.latents, noise, t, weighted=weighted)
        with autocast():
            pred = forward(
                prep.x_t,
                prep.timesteps,
                batch.te1_ids,
                batch.te2_ids,
                time_ids_from(batch.original_size, batch.crop, batch.target_size),
            )
        _, _, plain = objective.loss(pred, prep)
        plain = plain.double()
        per_sample = plain * prep.weight.double()
        bins = torch.clamp((prep.t.to(device) * t_bins).long(), 0, t_bins - 1)
        sums[-1] += plain.sum()
        sums[0] += per_sample.sum()
        sums[1] += len(rows)
        sums[2 : 2 + t_bins].index_add_(0, bins, per_sample)
        sums[2 + t_bins : 2 + 2 * t_bins].index_add_(0, bins, torch.ones_like(per_sample))
    all_reduce_sum(sums)
    out: dict[str, float] = {}
    if sums[1] > 0:
        out[f"{name}/loss"] = float(sums[0] / sums[1])
        if weighted:
            out[f"{name}/loss_plain"] = float(sums[-1] / sums[1])
    out[f"{name}/images"] = float(sums[1])
    for b in range(t_bins):
        n = float(sums[2 + t_bins + b])
        if n > 0:
            out[f"{name}/loss_t{b / t_bins:.1f}-{(b + 1) / t_bins:.1f}"] = float(sums[2 + b]) / n
    return out
