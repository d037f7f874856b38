"""Noise schedules, each giving the same sigma list as ComfyUI's scheduler of that name.

A schedule is a float32 tensor of descending sigmas ending with 0.0; a sampler takes
`len(sigmas) - 1` steps (which is *not* always `steps`: `beta` de-duplicates). The table
based schedules (`normal`, `simple`, `sgm_uniform`, `beta`) read the model's own sigma
table, so the flow shift acts through the table exactly as in ComfyUI; `karras` and
`exponential` only use the table's endpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from bigasp.sample.model_sampling import ModelSampling, model_sampling

BETA_ALPHA = 0.6
BETA_BETA = 0.6
KARRAS_RHO = 7.0


def normal(ms: ModelSampling, steps: int, *, sgm: bool = False) -> torch.Tensor:
    """Evenly spaced *timesteps* from sigma_max to sigma_min, mapped back through `ms.sigma`.

    For flow this applies the shift twice to the last sigma (`shift(shift(0.001))`), as
    ComfyUI and diffusers both do; kept for parity.
    """
    start = ms.timestep(torch.tensor(ms.sigma_max)).float()
    end = ms.timestep(torch.tensor(ms.sigma_min)).float()
    append_zero = True
    if sgm:
        ts = torch.linspace(float(start), float(end), steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0.0, abs_tol=1e-5):
            steps += 1
            append_zero = False
        ts = torch.linspace(float(start), float(end), steps)
    sig = [float(ms.sigma(t)) for t in ts]
    return torch.tensor([*sig, 0.0] if append_zero else sig, dtype=torch.float32)


def sgm_uniform(ms: ModelSampling, steps: int) -> torch.Tensor:
    return normal(ms, steps, sgm=True)


def simple(ms: ModelSampling, steps: int) -> torch.Tensor:
    """Every `len(table)/steps`-th table entry from the top."""
    stride = len(ms.sigmas) / steps
    sig = [float(ms.sigmas[-(1 + int(x * stride))]) for x in range(steps)]
    return torch.tensor([*sig, 0.0], dtype=torch.float32)


def beta(ms: ModelSampling, steps: int, alpha: float = BETA_ALPHA, b: float = BETA_BETA) -> torch.Tensor:
    """Beta(α, β) quantiles (`scipy.stats.beta.ppf`, as ComfyUI) of the timestep grid, rounded
    to table indices, consecutive duplicates dropped: may return fewer than `steps` steps
    (first at 139 steps for α=β=0.6).
    """
    from scipy.stats import beta as beta_dist

    total = len(ms.sigmas) - 1
    ts = 1.0 - np.linspace(0.0, 1.0, steps, endpoint=False)
    idx = np.rint(beta_dist.ppf(ts, alpha, b) * total)
    sig: list[float] = []
    last = -1.0
    for t in idx:
        if t != last:
            sig.append(float(ms.sigmas[int(t)]))
        last = t
    return torch.tensor([*sig, 0.0], dtype=torch.float32)


def karras(ms: ModelSampling, steps: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. (2022) rho-spaced sigmas between the table's endpoints."""
    ramp = torch.linspace(0, 1, steps)
    min_inv, max_inv = ms.sigma_min ** (1 / rho), ms.sigma_max ** (1 / rho)
    sig = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


def exponential(ms: ModelSampling, steps: int) -> torch.Tensor:
    """Log-uniform sigmas between the table's endpoints."""
    sig = torch.linspace(math.log(ms.sigma_max), math.log(ms.sigma_min), steps).exp()
    return torch.cat([sig, sig.new_zeros(1)])


SCHEDULERS: dict[str, Callable[[ModelSampling, int], torch.Tensor]] = {
    "normal": normal,
    "simple": simple,
    "sgm_uniform": sgm_uniform,
    "beta": beta,
    "karras": karras,
    "exponential": exponential,
}


def schedule(ms: ModelSampling, scheduler: str, steps: int) -> torch.Tensor:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return SCHEDULERS[scheduler](ms, steps)


def sigmas(kind: str, scheduler: str, steps: int, shift: float = 1.0) -> torch.Tensor:
    """The sigma list ComfyUI would use for a `kind` ('eps' | 'flow') model; ends with 0."""
    return schedule(model_sampling(kind, shift), scheduler, steps)
