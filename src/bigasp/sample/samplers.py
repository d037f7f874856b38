"""Samplers in k-diffusion form, matching ComfyUI's `comfy/k_diffusion/sampling.py`.

Each sampler is a short function of `(model, x, sigmas, ...)` where `model(x, sigma)`
returns the guided denoised estimate `D` and `sigmas` is a descending list ending in 0.
Sigmas are handled as Python floats, so every step coefficient is computed on the host
and the device only sees tensor arithmetic: no `.item()` or comparisons of device scalars
in the loop (ComfyUI compares device tensors, which syncs on CUDA).

Flow models (CONST) need one change in the DPM++ SDE samplers, as ComfyUI does since
PR #8541: half-log-SNR λ = log((1-σ)/σ), α = 1 - σ, and a first sigma of 1 (λ = -inf)
replaced by shift(0.9999). Euler and DPM++ 2M are used unchanged for both kinds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from bigasp.sample.model_sampling import ModelSampling, offset_first_sigma_for_snr

Model = Callable[[torch.Tensor, float], torch.Tensor]
NoiseSampler = Callable[[float, float], torch.Tensor]
Callback = Callable[[int, float, torch.Tensor, torch.Tensor], None]  # (step, sigma, x, denoised)


def _floats(sigmas: Sequence[float] | torch.Tensor) -> list[float]:
    return [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]


@torch.no_grad()
def sample_euler(
    model: Model,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler on the probability-flow ODE; for flow models `x += (σ' - σ)·v` exactly."""
    sig = _floats(sigmas)
    n = len(sig) - 1
    for i in range(n):
        s = sig[i]
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (gamma + 1)
        if gamma > 0:
            if noise_sampler is None:
                raise ValueError("euler with s_churn > 0 needs a noise_sampler")
            x = x + noise_sampler(s, sig[i + 1]) * s_noise * (s_hat**2 - s**2) ** 0.5
        denoised = model(x, s_hat)
        if callback is not None:
            callback(i, s, x, denoised)
        d = (x - denoised) / s_hat
        x = x + d * (sig[i + 1] - s_hat)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Model, x: torch.Tensor, sigmas: Sequence[float] | torch.Tensor, *, callback: Callback | None = None
) -> torch.Tensor:
    """DPM-Solver++(2M), deterministic; λ = -log σ for both kinds, as ComfyUI."""
    sig = _floats(sigmas)
    old_denoised = None
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i])
        if callback is not None:
            callback(i, sig[i], x, denoised)
        if sig[i + 1] == 0:
            # t_next = inf: the exponential integrator collapses to x = D.
            x = denoised
        else:
            t, t_next = -math.log(sig[i]), -math.log(sig[i + 1])
            h = t_next - t
            ratio, coef = sig[i + 1] / sig[i], -math.expm1(-h)
            if old_denoised is None:
                x = ratio * x + coef * denoised
            else:
                r = (t - (-math.log(sig[i - 1]))) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                x = ratio * x + coef * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Model,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    ms: ModelSampling,
    noise_sampler: NoiseSampler | None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (ComfyUI default: eta 1, midpoint)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sig = offset_first_sigma_for_snr(_floats(sigmas), ms)
    old_denoised, h_last, h = None, None, None
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i])
        if callback is not None:
            callback(i, sig[i], x, denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = ms.half_log_snr(sig[i]), ms.half_log_snr(sig[i + 1])
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sig[i + 1] * math.exp(lam_t)
            x = (sig[i + 1] / sig[i] * math.exp(-h * eta)) * x + (alpha_t * -math.expm1(-h_eta)) * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    c = alpha_t * (-math.expm1(-h_eta) / -h_eta + 1) * (1 / r)
                else:
                    c = 0.5 * alpha_t * -math.expm1(-h_eta) * (1 / r)
                x = x + c * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(sig[i], sig[i + 1]) * (
                    sig[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
                )
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model: Model,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    ms: ModelSampling,
    noise_sampler: NoiseSampler | None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE with ComfyUI's phi_3 sign (diffusers' 3rd-order branch differs)."""
    sig = offset_first_sigma_for_snr(_floats(sigmas), ms)
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(sig) - 1):
        denoised = model(x, sig[i])
        if callback is not None:
            callback(i, sig[i], x, denoised)
        if sig[i + 1] == 0:
            x = denoised
            h = None
        else:
            lam_s, lam_t = ms.half_log_snr(sig[i]), ms.half_log_snr(sig[i + 1])
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sig[i + 1] * math.exp(lam_t)
            x = (sig[i + 1] / sig[i] * math.exp(-h * eta)) * x + (alpha_t * -math.expm1(-h_eta)) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                r = h_1 / h
                x = x + (alpha_t * phi_2) * ((denoised - denoised_1) / r)
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(sig[i], sig[i + 1]) * (
                    sig[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
                )
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# -- noise for SDE samplers --------------------------------------------------------------


def iid_noise_sampler(x: torch.Tensor, generator: torch.Generator) -> NoiseSampler:
    """Fresh standard normal noise per step from an explicit generator on x's device
    (statistically like the Brownian tree, not the same samples)."""

    def sample(sigma: float, sigma_next: float) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    return sample


def brownian_noise_sampler(x: torch.Tensor, sigmas: Sequence[float], seed: int) -> NoiseSampler:
    """ComfyUI's `BrownianTreeNoiseSampler(x, σmin, σmax, seed, cpu=True)` (k-diffusion's):
    one `torchsde.BrownianTree` on the CPU over [σmin, σmax] of the *un-offset* schedule, w0 =
    zeros like `x`, entropy = the noise seed; a call returns the tree's increment between the
    two sigmas, sign-corrected for descending order and divided by sqrt(|Δσ|), all in float32
    as there. The increments are consistent across step counts (same seed, finer schedule:
    the same Brownian path).
    """
    import torchsde

    sig = _floats(sigmas)
    t0 = torch.tensor(min(s for s in sig if s > 0), dtype=torch.float32)
    t1 = torch.tensor(max(sig), dtype=torch.float32)
    w0 = torch.zeros(x.shape, device="cpu", dtype=torch.float32)
    tree = torchsde.BrownianTree(t0, w0, t1, entropy=seed)

    def sample(sigma: float, sigma_next: float) -> torch.Tensor:
        a = torch.tensor(sigma, dtype=torch.float32)
        b = torch.tensor(sigma_next, dtype=torch.float32)
        lo, hi, sign = (a, b, 1.0) if sigma < sigma_next else (b, a, -1.0)
        with warnings.catch_warnings():
            # torchsde stores t1 as a Python float and warns that float32 σmax "exceeds" it.
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            dw = tree(lo, hi) * sign
        n = dw / (b - a).abs().sqrt()
        if x.device.type == "cuda":  # pinned + non_blocking: no host sync in the sampling loop
            return n.pin_memory().to(x.device, x.dtype, non_blocking=True)
        return n.to(x.device, x.dtype)

    return sample


def keyed_noise_sampler(samplers: Sequence[NoiseSampler]) -> NoiseSampler:
    """Noise for a batch made of blocks, each drawn by its own sampler (concatenated on dim 0).

    Keying the noise per block (one prompt's images) is what keeps an image independent of
    which other prompts share the call.
    """

    def sample(sigma: float, sigma_next: float) -> torch.Tensor:
        parts = [ns(sigma, sigma_next) for ns in samplers]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    return sample


SAMPLERS = ("euler", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde")
STOCHASTIC = ("dpmpp_2m_sde", "dpmpp_3m_sde")


def run_sampler(
    name: str,
    model: Model,
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    ms: ModelSampling,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Dispatch by ComfyUI sampler name."""
    if name == "euler":
        return sample_euler(model, x, sigmas, callback=callback)
    if name == "dpmpp_2m":
        return sample_dpmpp_2m(model, x, sigmas, callback=callback)
    if name == "dpmpp_2m_sde":
        return sample_dpmpp_2m_sde(model, x, sigmas, ms=ms, noise_sampler=noise_sampler, callback=callback)
    if name == "dpmpp_3m_sde":
        return sample_dpmpp_3m_sde(model, x, sigmas, ms=ms, noise_sampler=noise_sampler, callback=callback)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
