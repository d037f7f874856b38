"""Training objectives as pure functions: what the UNet sees, what it must predict, how it is weighted.

Two objectives, one interface (`Objective.prepare` then `Objective.loss`):

* `eps` (bigASP v2): SDXL's own DDPM discretisation (scaled-linear betas 0.00085 -> 0.012 over
  1000 steps), integer timesteps drawn uniformly, the UNet predicts the added noise. Optional
  min-SNR-gamma weighting `min(SNR, gamma) / SNR` (Hang et al. 2023; bigASP used gamma = 5) and
  optional offset noise (bigASP used none).
* `flow` (bigASP v2.5): rectified flow on the same UNet. `x_t = (1 - t) x0 + t noise`, target
  `v = noise - x0`, UNet timestep `1000 t` (ComfyUI's ModelSamplingSD3 calls the UNet with
  `1000 sigma`, so a model trained this way samples correctly there). `t` is logit-normal or
  uniform, then optionally shifted with `shift t / (1 + (shift - 1) t)`, the same map
  ModelSamplingSD3 applies at inference.

Randomness never comes from a global RNG: every sample's noise and timestep come from a
generator seeded by an explicit key (run seed, step, dataset row), so the same sample gets the
same noise whatever the world size, worker count or resume point.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Literal

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012

Prediction = Literal["eps", "flow"]
FlowTimesteps = Literal["logit_normal", "uniform"]


def key_seed(*parts: int | str) -> int:
    """A 63-bit seed from an explicit key; stable across processes and Python versions (no hash())."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        data = p.encode() if isinstance(p, str) else struct.pack("<q", int(p))
        h.update(struct.pack("<I", len(data)) + data)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def keyed_generator(*parts: int | str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(key_seed(*parts))
    return g


# ---------------------------------------------------------------------------------------------
# eps: SDXL DDPM schedule


def ddpm_alphas_cumprod(
    num_steps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> torch.Tensor:
    """alpha-bar_t for SDXL's "scaled_linear" betas, float64 (ComfyUI's "linear" is the same)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


_ALPHAS_CUMPROD = ddpm_alphas_cumprod()


def eps_snr(timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha-bar / (1 - alpha-bar) at integer DDPM timesteps (float64)."""
    ac = _ALPHAS_CUMPROD[timesteps.long().cpu()]
    return (ac / (1.0 - ac)).to(timesteps.device)


def min_snr_weight(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-gamma loss weight for eps prediction: min(SNR, gamma) / SNR."""
    return torch.clamp(snr, max=gamma) / snr


# ---------------------------------------------------------------------------------------------
# flow: rectified flow timesteps


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """ComfyUI `time_snr_shift`: shift t / (1 + (shift - 1) t); identity for shift == 1."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_flow_t(
    generator: torch.Generator,
    *,
    distribution: FlowTimesteps,
    logit_mean: float,
    logit_std: float,
    shift: float,
) -> float:
    """One flow time in (0, 1): logit-normal (SD3's default) or uniform, then shifted."""
    if distribution == "logit_normal":
        z = torch.randn((), generator=generator, dtype=torch.float64) * logit_std + logit_mean
        t = torch.sigmoid(z)
    elif distribution == "uniform":
        t = torch.rand((), generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"unknown flow timestep distribution {distribution!r}")
    return float(shift_t(t, shift))


# ---------------------------------------------------------------------------------------------
# The objective


@dataclass(frozen=True)
class ObjectiveConfig:
    """The math knobs of the objective (copied from the run config's [train] table)."""

    prediction: Prediction = "eps"
    min_snr_gamma: float | None = 5.0  # eps only; None = plain MSE
    offset_noise: float = 0.0  # eps and flow; 0 = off (bigASP v2 used none)
    flow_timesteps: FlowTimesteps = "logit_normal"
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    flow_shift: float = 1.0


@dataclass
class Prepared:
    """One batch made ready for the UNet: noisy input, UNet timestep, regression target, weights.

    `t` is the objective's own time in [0, 1] (eps: timestep / 1000), used for per-t-bin metrics.
    """

    x_t: torch.Tensor
    timesteps: torch.Tensor  # float, what the UNet receives
    target: torch.Tensor
    weight: torch.Tensor  # [B] training loss weight
    t: torch.Tensor  # [B] in [0, 1]


class Objective:
    """eps or flow objective; `prepare` draws noise/timesteps from per-sample keyed generators."""

    def __init__(self, cfg: ObjectiveConfig):
        if cfg.prediction not in ("eps", "flow"):
            raise ValueError(f"prediction must be 'eps' or 'flow', got {cfg.prediction!r}")
        self.cfg = cfg

    def draw(self, generator: torch.Generator, shape: tuple[int, ...]) -> tuple[torch.Tensor, float]:
        """Noise (float32, CPU) and time in [0, 1] for one sample; eps times are k / 1000, k integer."""
        c = self.cfg
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if c.offset_noise:
            noise = noise + c.offset_noise * torch.randn(
                (shape[0], 1, 1), generator=generator, dtype=torch.float32
            )
        if c.prediction == "eps":
            k = int(torch.randint(0, NUM_TRAIN_TIMESTEPS, (), generator=generator))
            return noise, k / NUM_TRAIN_TIMESTEPS
        t = sample_flow_t(
            generator,
            distribution=c.flow_timesteps,
            logit_mean=c.flow_logit_mean,
            logit_std=c.flow_logit_std,
            shift=c.flow_shift,
        )
        return noise, t

    def prepare(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, *, weighted: bool = True
    ) -> Prepared:
        """Noisy input and target for clean latents `x0` [B,C,H,W] at times `t` [B] in [0, 1].

        `weighted=False` gives unit weights (validation always reports the plain loss).
        """
        x0 = x0.float()
        noise = noise.to(x0.device, torch.float32)
        t = t.to(x0.device, torch.float64)
        b = x0.shape[0]
        if self.cfg.prediction == "eps":
            k = torch.clamp(torch.round(t * NUM_TRAIN_TIMESTEPS), 0, NUM_TRAIN_TIMESTEPS - 1).long()
            ac = _ALPHAS_CUMPROD.to(x0.device)[k]
            a = ac.sqrt().float().view(b, 1, 1, 1)
            s = (1.0 - ac).sqrt().float().view(b, 1, 1, 1)
            x_t = a * x0 + s * noise
            target = noise
            timesteps = k.float()
            if weighted and self.cfg.min_snr_gamma is not None:
                weight = min_snr_weight(ac / (1.0 - ac), self.cfg.min_snr_gamma).float()
            else:
                weight = torch.ones(b, device=x0.device)
            return Prepared(x_t, timesteps, target, weight, k.double() / NUM_TRAIN_TIMESTEPS)
        tt = t.float().view(b, 1, 1, 1)
        x_t = (1.0 - tt) * x0 + tt * noise
        target = noise - x0
        return Prepared(x_t, t.float() * NUM_TRAIN_TIMESTEPS, target, torch.ones(b, device=x0.device), t)

    def sample_batch(
        self, x0: torch.Tensor, keys: list[tuple[int | str, ...]], *, weighted: bool = True
    ) -> Prepared:
        """Draw noise/time per sample from its key and prepare the batch (the training path)."""
        noises, ts = [], []
        for key in keys:
            n, t = self.draw(keyed_generator(*key), tuple(x0.shape[1:]))
            noises.append(n)
            ts.append(t)
        return self.prepare(x0, torch.stack(noises), torch.tensor(ts, dtype=torch.float64), weighted=weighted)

    @staticmethod
    def loss(pred: torch.Tensor, prep: Prepared) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(training loss, plain MSE, per-sample MSE [B]): MSE per sample first, then weighted mean."""
        per_sample = (pred.float() - prep.target.float()).pow(2).flatten(1).mean(1)
        weighted = (per_sample * prep.weight).mean()
        return weighted, per_sample.mean(), per_sample


def stratified_t(position: int, count: int) -> float:
    """The fixed evaluation time of the `position`-th of `count` samples: bin centres of [0, 1]."""
    return (position + 0.5) / count


def logit_normal_pdf(t: float, mean: float, std: float) -> float:
    """Density of the logit-normal distribution (for tests and docs)."""
    z = math.log(t / (1 - t))
    return math.exp(-((z - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
