"""The training loop both quality MLPs share: bigASP's notebook loop, with keyed randomness.

AdamW, OneCycleLR (max_lr = lr) over `samples // batch_size` steps, the batch iterator
restarted when exhausted (as the notebooks' `DataLoader(shuffle=True)`), each epoch's order a
permutation keyed by (seed, epoch). Initialisation and dropout draw from a torch RNG seeded
from (seed, name) inside `fork_rng`, so a run reproduces and leaves the caller's RNG alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from bigasp.quality.keys import key64, rng


def batches(n: int, batch_size: int, seed: int, name: str) -> Iterator[np.ndarray]:
    """Endless shuffled batches over n examples (last batch of an epoch may be short)."""
    epoch = 0
    while True:
        order = rng(seed, name, "epoch", epoch).permutation(n)
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size]
        epoch += 1


def device() -> torch.device:
    from bigasp.devices import resolve

    return resolve("auto")


def fit(
    build: Callable[[], torch.nn.Module],
    step_loss: Callable[[torch.nn.Module, np.ndarray], torch.Tensor],
    *,
    n: int,
    lr: float,
    weight_decay: float,
    samples: int,
    batch_size: int,
    seed: int,
    name: str,
) -> tuple[torch.nn.Module, list[float]]:
    """Train `build()` for samples // batch_size steps; `step_loss(model, idx)` gives the batch loss."""
    steps = max(1, samples // batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key64(seed, name, "torch"))
        model = build().to(device())
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        it = batches(n, batch_size, seed, name)
        losses = []
        model.train()
        for _ in range(steps):
            loss = step_loss(model, next(it))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    return model.eval(), losses


def held_out(units: list[str], fraction: float, seed: int, name: str) -> set[str]:
    """Exactly int(len(units) * fraction) units, chosen by a keyed hash (stable as data grows)."""
    order = sorted(units, key=lambda u: key64(seed, name, "split", u))
    return set(order[: int(len(units) * fraction)])
