"""Objective math against hand-computed values, timestep distributions, lr schedule, optimizer."""

from __future__ import annotations

import math

import pytest
import torch

from bigasp.train.objectives import (
    Objective,
    ObjectiveConfig,
    ddpm_alphas_cumprod,
    eps_snr,
    key_seed,
    keyed_generator,
    min_snr_weight,
    sample_flow_t,
    shift_t,
)
from bigasp.train.optim import build_optimizer, set_lr
from bigasp.train.schedule import lr_multiplier


def test_ddpm_schedule_matches_sdxl_reference_values():
    ac = ddpm_alphas_cumprod()
    # betas: linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 -> beta_0 = 0.00085, beta_999 = 0.012
    assert float(1 - ac[0]) == pytest.approx(0.00085, rel=1e-12)
    # ComfyUI/k-diffusion sigma table ends (sampling.md 1.2): sigma = sqrt((1 - ac) / ac)
    sigma = ((1 - ac) / ac).sqrt()
    assert float(sigma[0]) == pytest.approx(0.029167158151720367, rel=1e-12)
    assert float(sigma[999]) == pytest.approx(14.614641229333639, rel=1e-12)
    # hand value: alpha-bar_1 = (1 - 0.00085) * (1 - beta_1)
    b1 = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2
    assert float(ac[1]) == pytest.approx((1 - 0.00085) * (1 - b1), rel=1e-12)


def test_min_snr_weights():
    snr = torch.tensor([0.1, 1.0, 5.0, 20.0, 1000.0], dtype=torch.float64)
    w = min_snr_weight(snr, 5.0)
    assert w.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.25, 0.005])
    t = torch.tensor([0, 999])
    s = eps_snr(t)
    assert float(s[0]) == pytest.approx(1 / 0.029167158151720367**2, rel=1e-9)
    assert float(min_snr_weight(s, 5.0)[0]) == pytest.approx(5 * 0.029167158151720367**2, rel=1e-9)
    assert float(min_snr_weight(s, 5.0)[1]) == 1.0  # SNR < 5 at the noisy end: unit weight


def test_eps_prepare_and_loss_hand_computed():
    obj = Objective(ObjectiveConfig(prediction="eps", min_snr_gamma=5.0))
    x0 = torch.full((2, 4, 2, 2), 0.5)
    noise = torch.full((2, 4, 2, 2), -1.0)
    t = torch.tensor([0.0, 0.5])  # timesteps 0 and 500
    prep = obj.prepare(x0, noise, t)
    ac = ddpm_alphas_cumprod()
    for i, k in enumerate((0, 500)):
        expect = math.sqrt(ac[k]) * 0.5 + math.sqrt(1 - ac[k]) * -1.0
        assert torch.allclose(prep.x_t[i], torch.full((4, 2, 2), expect, dtype=torch.float32), atol=1e-6)
        snr = float(ac[k] / (1 - ac[k]))
        assert float(prep.weight[i]) == pytest.approx(min(snr, 5.0) / snr, rel=1e-6)
    assert prep.timesteps.tolist() == [0.0, 500.0]
    assert torch.equal(prep.target, noise)
    pred = torch.zeros_like(x0)
    pred[1] = -0.5  # per-sample MSE: sample 0 -> 1.0, sample 1 -> 0.25
    weighted, mse, per = obj.loss(pred, prep)
    assert per.tolist() == pytest.approx([1.0, 0.25])
    assert float(mse) == pytest.approx(0.625)
    assert float(weighted) == pytest.approx((1.0 * float(prep.weight[0]) + 0.25 * float(prep.weight[1])) / 2)


def test_flow_prepare_hand_computed():
    obj = Objective(ObjectiveConfig(prediction="flow"))
    x0 = torch.tensor([2.0, 4.0]).view(2, 1, 1, 1).expand(2, 4, 3, 3).contiguous()
    noise = torch.full_like(x0, 1.0)
    prep = obj.prepare(x0, noise, torch.tensor([0.25, 1.0]))
    assert prep.x_t[0, 0, 0, 0].item() == pytest.approx(0.75 * 2 + 0.25 * 1)
    assert prep.x_t[1, 0, 0, 0].item() == pytest.approx(1.0)  # pure noise at t = 1
    assert prep.target[:, 0, 0, 0].tolist() == [-1.0, -3.0]  # v = noise - x0
    assert prep.timesteps.tolist() == [250.0, 1000.0]
    assert prep.weight.tolist() == [1.0, 1.0]
    # A perfect v prediction recovers x0 = x_t - t v (ComfyUI CONST denoised)
    x0_hat = prep.x_t - torch.tensor([0.25, 1.0]).view(2, 1, 1, 1) * prep.target
    assert torch.allclose(x0_hat, x0)


def test_shift_is_comfy_time_snr_shift():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.equal(shift_t(t, 1.0), t)
    assert shift_t(t, 3.0).tolist() == pytest.approx([0.0, 0.75 / 1.5, 1.5 / 2.0, 1.0])


def _many_t(n: int, **kw) -> torch.Tensor:
    return torch.tensor([sample_flow_t(keyed_generator(7, i), **kw) for i in range(n)], dtype=torch.float64)


def test_flow_timestep_distributions_statistical():
    n = 4000
    # logit-normal(0.3, 0.8): logit(t) must be N(0.3, 0.8); SE of the mean 0.8/sqrt(4000) = 0.013
    t = _many_t(n, distribution="logit_normal", logit_mean=0.3, logit_std=0.8, shift=1.0)
    z = torch.log(t / (1 - t))
    assert abs(float(z.mean()) - 0.3) < 0.05
    assert abs(float(z.std()) - 0.8) < 0.04
    # uniform then shift 3: P(t' <= x) = P(t <= x / (3 - 2x)) -> at x = 0.5 that is 0.25
    u = _many_t(n, distribution="uniform", logit_mean=0.0, logit_std=1.0, shift=3.0)
    assert abs(float((u <= 0.5).double().mean()) - 0.25) < 0.025  # 3.6 sigma
    assert abs(float((u <= 0.75).double().mean()) - 0.5) < 0.03
    assert float(u.min()) >= 0.0 and float(u.max()) <= 1.0


def test_eps_timesteps_uniform_over_1000_integers():
    obj = Objective(ObjectiveConfig(prediction="eps"))
    ks = torch.tensor([round(obj.draw(keyed_generator(3, i), (1, 1, 1))[1] * 1000) for i in range(5000)])
    assert int(ks.min()) >= 0 and int(ks.max()) <= 999
    hist = torch.bincount(ks // 100, minlength=10).double()  # 500 expected per decile, sd ~21
    assert float((hist - 500).abs().max()) < 90


def test_noise_is_keyed_not_global():
    obj = Objective(ObjectiveConfig(prediction="flow"))
    torch.manual_seed(0)
    a = obj.sample_batch(torch.zeros(2, 4, 2, 2), [(1, "noise", 0, 5), (1, "noise", 0, 6)])
    torch.manual_seed(123)  # the global RNG must not matter
    b = obj.sample_batch(torch.zeros(1, 4, 2, 2), [(1, "noise", 0, 6)])
    assert torch.equal(a.x_t[1], b.x_t[0]) and torch.equal(a.t[1:], b.t)
    assert not torch.equal(a.x_t[0], a.x_t[1])
    assert key_seed(1, "a") != key_seed(1, "b") and key_seed(1, 2) == key_seed(1, 2)


def test_offset_noise_adds_per_channel_constant():
    obj = Objective(ObjectiveConfig(prediction="eps", offset_noise=0.5))
    plain = Objective(ObjectiveConfig(prediction="eps"))
    n1, _ = obj.draw(keyed_generator(1), (4, 8, 8))
    n0, _ = plain.draw(keyed_generator(1), (4, 8, 8))
    diff = n1 - n0
    assert torch.allclose(diff, diff[:, :1, :1].expand_as(diff))  # constant per channel
    assert float(diff.abs().max()) > 0


def test_lr_schedule_in_samples():
    kw = dict(warmup_samples=100_000, total_samples=1_100_000, min_ratio=0.1)
    assert lr_multiplier(0, **kw) == 0.0
    assert lr_multiplier(50_000, **kw) == pytest.approx(0.5)
    assert lr_multiplier(100_000, **kw) == pytest.approx(1.0)
    assert lr_multiplier(600_000, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert lr_multiplier(1_100_000, **kw) == pytest.approx(0.1)
    assert lr_multiplier(2_000_000, **kw) == pytest.approx(0.1)
    assert lr_multiplier(600_000, schedule="constant", **kw) == 1.0


def test_optimizer_groups_and_lr():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.requires_grad_(False)
    c = torch.nn.Linear(2, 1)
    opt = build_optimizer(
        [
            ("unet", list(a.parameters()), 1e-4),
            ("te", list(c.parameters()), 1e-5),
            ("te2", list(b.parameters()), 1),
        ]
    )
    assert [g["name"] for g in opt.param_groups] == ["unet", "te"]  # frozen group dropped
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 and g["weight_decay"] == 0.1
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-5, 5e-6])


class _Oracle(torch.nn.Module):
    """A 'UNet' that predicts the training target exactly: it answers `target` when called with
    exactly the input and timestep training showed the UNet for this sample, and fails otherwise."""

    def __init__(self, x_t: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor):
        super().__init__()
        self.dtype_anchor = torch.nn.Parameter(torch.zeros(()))
        self.x_t, self.timesteps, self.target = x_t, timesteps, target

    def forward(self, x, t, *, encoder_hidden_states, added_cond_kwargs, return_dict):
        scale = 1e-6 * (1.0 + self.x_t.abs().max())
        assert torch.allclose(x, self.x_t, rtol=0, atol=scale), (x - self.x_t).abs().max()
        assert torch.allclose(t, self.timesteps.float(), rtol=1e-6, atol=0), (t, self.timesteps)
        return (self.target,)


@pytest.mark.parametrize(
    ("prediction", "shift"), [("eps", 1.0), ("flow", 1.0), ("flow", 3.0), ("flow", 6.0), ("flow", 12.0)]
)
def test_sampler_denoised_map_recovers_x0_from_a_perfect_training_prediction(prediction, shift):
    """Training (`bigasp.train.objectives`) and sampling (`bigasp.sample.model_sampling`, called through
    the samplers' `GuidedDenoiser`) must agree on the UNet's input, timestep and output meaning: a
    model that predicts the training target exactly gives back x0 from the sampler's denoised map."""
    from bigasp.sample.guidance import Conditioning, GuidedDenoiser
    from bigasp.sample.model_sampling import model_sampling

    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, 4, 8, 6, generator=g)
    noise = torch.randn(1, 4, 8, 6, generator=g)
    objective = Objective(ObjectiveConfig(prediction=prediction, flow_shift=shift))
    ms = model_sampling(prediction, shift)
    cond = Conditioning(torch.zeros(1, 77, 8), torch.zeros(1, 4), torch.zeros(1, 6))
    # times the objective trains at: eps integer steps; flow = shift(u) for u on a grid, as draw() makes them
    if prediction == "eps":
        times = [k / 1000 for k in (0, 1, 9, 250, 500, 777, 999)]
    else:
        times = [
            float(shift_t(torch.tensor(u, dtype=torch.float64), shift)) for u in (0.001, 0.1, 0.5, 0.9, 0.999)
        ]
        drawn = objective.draw(keyed_generator(1, 2), (4, 8, 6))[1]
        assert 0 < drawn < 1
        times.append(drawn)
    for t in times:
        prep = objective.prepare(x0, noise, torch.tensor([t], dtype=torch.float64))
        # the sampler's sigma for that training time: eps = its own table at the integer step; flow = t
        # itself (ComfyUI's shifted flow table holds shift(k/1000), the times training draws)
        sigma = float(ms.sigma(prep.timesteps)) if prediction == "eps" else t
        x = ms.noise_scaling(sigma, noise, x0, max_denoise=False)  # the sampler's latent at sigma
        denoise = GuidedDenoiser(_Oracle(prep.x_t, prep.timesteps, prep.target), ms, cond, None, cfg=1.0)
        d = denoise(x, sigma)
        tol = 2e-6 * (1.0 + sigma)
        assert torch.allclose(d, x0, rtol=0, atol=tol), (t, sigma, float((d - x0).abs().max()))
