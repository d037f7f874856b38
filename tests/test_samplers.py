"""Sampler steps against closed forms of the formulas in the reference note (§3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bigasp.sample import sigmas
from bigasp.sample.model_sampling import EpsDiscrete, FlowConst
from bigasp.sample.samplers import (
    run_sampler,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_euler,
)

SIG = [10.0, 4.0, 1.5, 0.5, 0.1]


def const_model(a: torch.Tensor, seen: list | None = None):
    def model(x, sigma):
        if seen is not None:
            seen.append(sigma)
        return a.expand_as(x).clone()

    return model


def zeros(sigma, sigma_next):
    return torch.zeros(2, 3, dtype=torch.float64)


def test_euler_linear_model_closed_form():
    c = 0.3
    x0 = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    out = sample_euler(lambda x, s: c * x, x0, SIG)
    factor = np.prod([1 + (1 - c) * (SIG[i + 1] - SIG[i]) / SIG[i] for i in range(len(SIG) - 1)])
    torch.testing.assert_close(out, x0 * factor)


def test_euler_flow_step_is_x_plus_dsigma_v_and_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    ms = FlowConst(3.0)
    sig = sigmas("flow", "normal", 4, 3.0).tolist()

    def v_of(x, sigma):  # a fixed "velocity network"
        return torch.sin(x) + sigma

    x0 = torch.linspace(-1, 1, 6, dtype=torch.float32).reshape(1, 6)
    out = sample_euler(lambda x, s: ms.denoised(s, v_of(x, s), x), x0, sig)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    x = x0.clone()
    for t in sched.timesteps:
        s = float(t) / 1000
        x = sched.step(v_of(x, s), t, x).prev_sample
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-6)


def test_dpmpp_2m_exact_for_constant_denoised():
    a = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    x0 = torch.tensor([[3.0, 1.0, -4.0]], dtype=torch.float64)
    seen = []
    out = sample_dpmpp_2m(const_model(a, seen), x0, SIG)
    # exponential integrator: x(σ) = a + (x0 - a)·σ/σ0 exactly
    torch.testing.assert_close(out, a + (x0 - a) * SIG[-1] / SIG[0])
    assert seen == SIG[:-1]
    assert torch.equal(sample_dpmpp_2m(const_model(a), x0, [*SIG, 0.0]), a)  # last step returns D


def test_dpmpp_2m_second_order_step():
    ds = [torch.full((1, 2), v, dtype=torch.float64) for v in (1.0, 2.0, 3.0)]
    it = iter(ds)
    x0 = torch.ones(1, 2, dtype=torch.float64)
    s = [10.0, 5.0, 2.0]
    out = sample_dpmpp_2m(lambda x, sig: next(it), x0, s)
    x1 = (s[1] / s[0]) * x0 + (1 - s[1] / s[0]) * ds[0]
    h, h_last = math.log(s[1] / s[2]), math.log(s[0] / s[1])
    r = h_last / h
    dd = (1 + 1 / (2 * r)) * ds[1] - (1 / (2 * r)) * ds[0]
    torch.testing.assert_close(out, (s[2] / s[1]) * x1 + (1 - s[2] / s[1]) * dd)


def test_dpmpp_2m_sde_eps_closed_form_with_noise():
    ms = EpsDiscrete()
    a = torch.full((1, 3), 0.7, dtype=torch.float64)
    x0 = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    n = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    s0, s1 = 8.0, 2.0
    out = sample_dpmpp_2m_sde(const_model(a), x0, [s0, s1], ms=ms, noise_sampler=lambda u, v: n)
    q = (s1 / s0) ** 2  # eps: λ = -log σ, eta = 1 -> e^{-2h} = (σ'/σ)²
    expected = q * x0 + (1 - q) * a + s1 * math.sqrt(1 - q) * n
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("fn", [sample_dpmpp_2m_sde, sample_dpmpp_3m_sde])
def test_flow_sde_keeps_noiseless_path(fn):
    """With D = x0 and zero noise, flow λ = log((1-σ)/σ), α = 1-σ keep x = (1-σ)·x0 exactly."""
    ms = FlowConst(1.0)
    a = torch.tensor([[0.3, -0.6, 1.2]], dtype=torch.float64)
    s = [0.9, 0.6, 0.35, 0.1, 0.02]
    out = fn(const_model(a), (1 - s[0]) * a, s, ms=ms, noise_sampler=lambda u, v: torch.zeros_like(a))
    torch.testing.assert_close(out, (1 - s[-1]) * a)


@pytest.mark.parametrize("fn", [sample_dpmpp_2m_sde, sample_dpmpp_3m_sde])
def test_flow_sde_offsets_first_sigma(fn):
    ms = FlowConst(6.0)
    seen = []
    a = torch.zeros(1, 2, dtype=torch.float64)
    sig = sigmas("flow", "normal", 3, 6.0).tolist()
    fn(const_model(a, seen), torch.ones(1, 2, dtype=torch.float64), sig, ms=ms, noise_sampler=lambda u, v: a)
    assert seen[0] == pytest.approx(6 * 0.9999 / (1 + 5 * 0.9999), rel=1e-7)
    assert seen[1:] == sig[1:-1]


def test_sde_final_step_returns_denoised():
    ms = EpsDiscrete()
    a = torch.full((1, 2), 0.25, dtype=torch.float64)
    for fn in (sample_dpmpp_2m_sde, sample_dpmpp_3m_sde):
        out = fn(const_model(a), torch.ones(1, 2, dtype=torch.float64), [3.0, 1.0, 0.0], ms=ms,
                 noise_sampler=lambda u, v: torch.ones(1, 2, dtype=torch.float64))  # fmt: skip
        assert torch.equal(out, a)


def _ode_error(fn, n: int, **kw) -> float:
    """eta=0 (deterministic) on D(λ) = cos λ; exact: x_t = σ_t/σ_s·x_s + σ_t·[e^λ(cos λ+sin λ)/2]_s^t."""
    ms = EpsDiscrete()
    s_hi, s_lo = 10.0, 0.1
    lam = np.linspace(-math.log(s_hi), -math.log(s_lo), n + 1)
    sig = list(np.exp(-lam))
    x0 = torch.tensor([[1.0]], dtype=torch.float64)

    def model(x, sigma):
        return torch.full_like(x, math.cos(-math.log(sigma)))

    out = fn(model, x0, sig, ms=ms, noise_sampler=None, eta=0.0, **kw)

    def prim(lm):
        return math.exp(lm) * (math.cos(lm) + math.sin(lm)) / 2

    exact = s_lo / s_hi * 1.0 + s_lo * (prim(lam[-1]) - prim(lam[0]))
    return abs(float(out) - exact)


def test_dpmpp_3m_is_third_order_and_2m_second_order():
    e3 = [_ode_error(sample_dpmpp_3m_sde, n) for n in (10, 20, 40)]
    e2 = [_ode_error(sample_dpmpp_2m_sde, n) for n in (10, 20, 40)]
    # halving h divides the error by ~2^order (ComfyUI's phi_3 sign; diffusers' would not)
    assert e3[1] / e3[2] > 6.0 and e3[0] / e3[1] > 5.0, e3
    assert 3.0 < e2[1] / e2[2] < 5.5, e2


def test_iid_noise_sampler_is_seeded(tiny_generator_seed=3):
    from bigasp.sample.samplers import iid_noise_sampler

    x = torch.zeros(2, 4, 2, 2)
    a = iid_noise_sampler(x, torch.Generator().manual_seed(tiny_generator_seed))(1.0, 0.5)
    b = iid_noise_sampler(x, torch.Generator().manual_seed(tiny_generator_seed))(1.0, 0.5)
    assert torch.equal(a, b) and a.shape == x.shape and float(a.std()) > 0.5


def test_run_sampler_dispatch_and_unknown():
    a = torch.zeros(1, 2)
    out = run_sampler("euler", const_model(a), torch.ones(1, 2), [2.0, 1.0, 0.0], ms=EpsDiscrete())
    assert torch.equal(out, a)
    with pytest.raises(ValueError, match="unknown sampler"):
        run_sampler("lms", const_model(a), a, [1.0, 0.0], ms=EpsDiscrete())


def _eps_fn(x, sigma):
    return 0.2 * x / math.sqrt(1 + sigma * sigma) + math.sin(sigma)


@pytest.mark.parametrize("algo", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpmpp_2m_and_2m_sde_match_diffusers_with_shared_noise(algo):
    """Reference §7.2: the 1st/2nd-order (midpoint) updates are algebraically the same as diffusers'."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", algorithm_type=algo,
        solver_order=2, use_karras_sigmas=True, lower_order_final=False, final_sigmas_type="zero",
    )  # fmt: skip
    sched.set_timesteps(16)
    sig = [float(s) for s in sched.sigmas]
    g = torch.Generator().manual_seed(0)
    noises = [torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64) for _ in sig]
    x_ve0 = torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64) * sig[0]

    x_vp = x_ve0 / math.sqrt(1 + sig[0] ** 2)
    for i, t in enumerate(sched.timesteps):
        x_ve = x_vp * math.sqrt(1 + sig[i] ** 2)
        x_vp = sched.step(_eps_fn(x_ve, sig[i]), t, x_vp, variance_noise=noises[i]).prev_sample

    it = iter(noises)
    model = lambda x, s: x - s * _eps_fn(x, s)  # noqa: E731
    if algo == "dpmsolver++":
        ours = sample_dpmpp_2m(model, x_ve0, sig)
    else:
        ours = sample_dpmpp_2m_sde(model, x_ve0, sig, ms=EpsDiscrete(), noise_sampler=lambda u, v: next(it))
    torch.testing.assert_close(ours, x_vp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"])
@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("noise", ["iid", "brownian"])
def test_sampling_loop_never_reads_device_values(name, kind, noise, host_sync_trap):
    """CPU twin of the GPU sync-debug test: samplers only do tensor arithmetic on x and D."""
    from bigasp.sample.samplers import brownian_noise_sampler, iid_noise_sampler

    ms = EpsDiscrete() if kind == "eps" else FlowConst(3.0)
    x = torch.randn(1, 4, 2, 2).as_subclass(host_sync_trap)
    with pytest.raises(AssertionError, match="host sync"):
        bool(x.sum() > 0)  # the trap works
    sig = sigmas(kind, "karras", 5, 3.0).tolist()
    ns = (iid_noise_sampler(x, torch.Generator().manual_seed(0)) if noise == "iid"
          else brownian_noise_sampler(x, sig, seed=0))  # fmt: skip
    out = run_sampler(name, lambda x, s: 0.5 * x, x, sig, ms=ms, noise_sampler=ns)
    assert isinstance(out, host_sync_trap)


@pytest.mark.gpu
@pytest.mark.parametrize("noise", ["iid", "brownian"])
def test_sampling_loop_has_no_cuda_sync(tiny_model, noise):
    from bigasp.sample.guidance import Conditioning, GuidedDenoiser, perturbed_attention
    from bigasp.sample.samplers import brownian_noise_sampler, iid_noise_sampler

    unet = tiny_model.unet.to("cuda")
    try:
        c = unet.config
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        cond = Conditioning(torch.randn(1, 77, c.cross_attention_dim, device="cuda"),
                            torch.randn(1, pooled, device="cuda"), torch.ones(1, 6, device="cuda"))  # fmt: skip
        den = GuidedDenoiser(unet, FlowConst(1.0), cond, cond, cfg=3.0, pag=2.0)
        x = torch.randn(1, 4, 8, 8, device="cuda")
        sig = sigmas("flow", "beta", 4).tolist()
        ns = (iid_noise_sampler(x, torch.Generator("cuda").manual_seed(0)) if noise == "iid"
              else brownian_noise_sampler(x, sig, seed=0))  # fmt: skip
        with perturbed_attention(unet, den.state):
            run_sampler("dpmpp_2m_sde", den, x, sig, ms=FlowConst(1.0), noise_sampler=ns)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                run_sampler("dpmpp_2m_sde", den, x, sig, ms=FlowConst(1.0), noise_sampler=ns)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        unet.to("cpu")


class TorchsdeReferenceNoise:
    """k-diffusion's BrownianTreeNoiseSampler (as ComfyUI runs it, cpu=True), written against
    torchsde directly: one tree over [σmin, σmax], w0 = 0, entropy = seed."""

    def __init__(self, x, sigma_min, sigma_max, seed):
        import torchsde

        self.tree = torchsde.BrownianTree(sigma_min, torch.zeros_like(x), sigma_max, entropy=seed)

    def __call__(self, sigma, sigma_next):
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        return self.tree(lo, hi) * sign / (t1 - t0).abs().sqrt()


def reference_dpmpp_2m_sde(model, x, sigmas, noise_sampler):
    """k-diffusion's sample_dpmpp_2m_sde (eps, eta 1, midpoint) in float32 tensor arithmetic."""
    old_denoised = h_last = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            x = sigmas[i + 1] / sigmas[i] * (-h).exp() * x + (-2 * h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x + 0.5 * (-2 * h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h).expm1().neg().sqrt()
        old_denoised, h_last = denoised, h
    return x


@pytest.mark.filterwarnings("ignore:Should have t")  # the reference tree, as in ComfyUI
def test_brownian_noise_equals_torchsde_reference_exactly():
    from bigasp.sample.samplers import brownian_noise_sampler

    sig = sigmas("eps", "karras", 12)
    x = torch.zeros(2, 4, 3, 3)
    ref = TorchsdeReferenceNoise(x, sig[sig > 0].min(), sig.max(), seed=1234)
    ours = brownian_noise_sampler(x, sig.tolist(), seed=1234)
    for i in range(len(sig) - 2):  # samplers never ask for noise at σ = 0
        torch.testing.assert_close(
            ours(float(sig[i]), float(sig[i + 1])), ref(sig[i], sig[i + 1]), rtol=0, atol=0
        )
    n = ours(float(sig[0]), float(sig[1]))
    assert 0.5 < float(n.std()) < 1.5  # unit-variance increments
    other = brownian_noise_sampler(x, sig.tolist(), seed=1235)(float(sig[0]), float(sig[1]))
    assert not torch.equal(n, other)


@pytest.mark.filterwarnings("ignore:Should have t")  # the reference tree, as in ComfyUI
def test_dpmpp_2m_sde_with_brownian_noise_matches_torchsde_reference_within_fp32_rounding():
    from bigasp.sample.samplers import brownian_noise_sampler

    sig = sigmas("eps", "karras", 12)
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * sig[0]
    model = lambda x, s: 0.3 * x / (1 + float(s) ** 2) + math.sin(float(s))  # noqa: E731
    ref = reference_dpmpp_2m_sde(model, x0, sig, TorchsdeReferenceNoise(x0, sig[sig > 0].min(), sig.max(), 7))
    ns = brownian_noise_sampler(x0, sig.tolist(), seed=7)
    ours = run_sampler("dpmpp_2m_sde", model, x0, sig.tolist(), ms=EpsDiscrete(), noise_sampler=ns)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # host-side coefficients: not bit-exact


def test_keyed_noise_gives_each_block_its_own_sampler():
    from bigasp.sample.samplers import brownian_noise_sampler, keyed_noise_sampler

    sig = [1.0, 0.5, 0.2, 0.0]
    x = torch.zeros(3, 4, 2, 2)
    blocks = [brownian_noise_sampler(b, sig, seed=5) for b in x.chunk(3)]
    n = keyed_noise_sampler(blocks)(0.5, 0.2)
    alone = brownian_noise_sampler(x[:1], sig, seed=5)(0.5, 0.2)
    assert n.shape == x.shape
    for k in range(3):
        assert torch.equal(n[k : k + 1], alone)
