"""How a UNet's output becomes a denoised image: the sigma table and the parameterisation.

ComfyUI splits this in two: a *sampling table* (discrete SDXL eps table, or the shifted
flow table) and a *parameterisation* (EPS or CONST) that says how the UNet input is scaled,
which timestep it sees and how its output maps to the denoised estimate `D`. bigasp keeps
the same split so every formula can be checked against `comfy/model_sampling.py`. Tables
are float32 as ComfyUI stores them (schedules index into them, so the rounding matters).

Scalar helpers take and return Python floats: samplers compute their step coefficients on
the host so the GPU loop never waits on a `.item()`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

# SDXL's DDPM schedule ("scaled_linear" in diffusers, "linear" in ComfyUI).
LINEAR_START = 0.00085
LINEAR_END = 0.012
NUM_TIMESTEPS = 1000
FLOW_MULTIPLIER = 1000.0


def time_snr_shift(shift: float, t):
    """SD3/ModelSamplingSD3 timestep shift; works on floats and tensors alike."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def eps_sigma_table() -> torch.Tensor:
    """SDXL sigmas in float64 (betas from a float64 linspace of square roots, as ComfyUI)."""
    betas = torch.linspace(LINEAR_START**0.5, LINEAR_END**0.5, NUM_TIMESTEPS, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


class ModelSampling(ABC):
    """Common interface; `sigmas` is the ascending float32 table schedules index into."""

    def __init__(self, sigmas: torch.Tensor, prediction: str, shift: float) -> None:
        self.sigmas = sigmas
        self.prediction = prediction
        self.shift = shift

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prediction={self.prediction!r}, shift={self.shift})"

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @abstractmethod
    def timestep(self, sigma: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def sigma(self, timestep: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def percent_to_sigma(self, percent: float) -> float: ...

    @abstractmethod
    def input_scale(self, sigma: float) -> float:
        """Factor applied to `x` before the UNet (calculate_input)."""
        ...

    def denoised(self, sigma: float, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """calculate_denoised: both EPS and CONST give `x - sigma * out`."""
        return x - sigma * out

    @abstractmethod
    def noise_scaling(self, sigma: float, noise: torch.Tensor, latent: torch.Tensor, max_denoise: bool): ...

    @abstractmethod
    def half_log_snr(self, sigma: float) -> float:
        """λ(σ) used by the DPM++ SDE samplers."""
        ...

    def timesteps_for(self, sigmas: list[float]) -> list[float]:
        """UNet timestep for each sigma in a schedule (host-side, computed once per run)."""
        t = self.timestep(torch.tensor(sigmas, dtype=torch.float32))
        return [float(v) for v in t.float()]


class EpsDiscrete(ModelSampling):
    """SDXL eps prediction on the 1000-entry discrete table (ModelSamplingDiscrete + EPS)."""

    def __init__(self) -> None:
        table = eps_sigma_table()
        super().__init__(sigmas=table.float(), prediction="eps", shift=1.0)
        self.log_sigmas = table.log().float()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest table index in log sigma (an integer; the UNet gets it as a float)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        dists = sigma.log().reshape(1, -1) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Log-linear interpolation of the table at a fractional timestep."""
        t = torch.clamp(torch.as_tensor(timestep).float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * 999.0)))

    def input_scale(self, sigma: float) -> float:
        return 1.0 / math.sqrt(sigma * sigma + 1.0)

    def noise_scaling(self, sigma, noise, latent, max_denoise):
        # Starting from sigma_max ComfyUI scales to unit *input* variance, sqrt(1 + σ²).
        scale = math.sqrt(1.0 + sigma * sigma) if max_denoise else sigma
        return noise * scale + latent

    def half_log_snr(self, sigma: float) -> float:
        return -math.log(sigma)


class FlowConst(ModelSampling):
    """Rectified flow, `x_σ = (1-σ)·x0 + σ·ε`, UNet predicts `v = ε - x0` (DiscreteFlow + CONST).

    This is what ComfyUI's ModelSamplingSD3 node builds: the table is `shift((k+1)/1000)`,
    the UNet sees the unscaled input at the continuous timestep `1000·σ`.
    """

    def __init__(self, shift: float = 1.0) -> None:
        if not shift > 0:
            raise ValueError(f"flow shift must be > 0, got {shift}")
        t = torch.arange(1, NUM_TIMESTEPS + 1, 1) / NUM_TIMESTEPS * FLOW_MULTIPLIER
        super().__init__(sigmas=time_snr_shift(shift, t / FLOW_MULTIPLIER), prediction="flow", shift=shift)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float32) * FLOW_MULTIPLIER

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return time_snr_shift(self.shift, torch.as_tensor(timestep).float() / FLOW_MULTIPLIER)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return time_snr_shift(self.shift, 1.0 - percent)

    def input_scale(self, sigma: float) -> float:
        return 1.0

    def noise_scaling(self, sigma, noise, latent, max_denoise):
        return sigma * noise + (1.0 - sigma) * latent

    def half_log_snr(self, sigma: float) -> float:
        return math.log((1.0 - sigma) / sigma)


def model_sampling(prediction: str, shift: float = 1.0) -> ModelSampling:
    """`eps` (SDXL, bigASP v2) or `flow` (bigASP v2.5); `shift` only affects flow."""
    if prediction == "eps":
        return EpsDiscrete()
    if prediction == "flow":
        return FlowConst(shift)
    raise ValueError(f"unknown prediction {prediction!r}; expected 'eps' or 'flow'")


def offset_first_sigma_for_snr(sigmas: list[float], ms: ModelSampling) -> list[float]:
    """Flow λ(1) is -inf, so ComfyUI starts the SDE samplers from shift(0.9999) instead."""
    if ms.prediction == "flow" and sigmas and sigmas[0] >= 1.0:
        first = float(torch.tensor(ms.percent_to_sigma(1e-4), dtype=torch.float32))
        return [first, *sigmas[1:]]
    return list(sigmas)


def max_denoise(ms: ModelSampling, first_sigma: float) -> bool:
    """KSAMPLER's test for "starting from pure noise"."""
    return math.isclose(ms.sigma_max, first_sigma, rel_tol=1e-05) or first_sigma > ms.sigma_max
