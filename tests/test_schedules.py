"""Schedules against ComfyUI's definitions, independent closed forms, and diffusers where they agree."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bigasp.sample import sigmas
from bigasp.sample.model_sampling import EpsDiscrete, FlowConst
from bigasp.sample.schedules import SCHEDULERS

KINDS = [("eps", 1.0), ("flow", 1.0), ("flow", 6.0)]


def shift_fn(s: float, t: float) -> float:
    return s * t / (1 + (s - 1) * t)


def eps_table64() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1 - betas)
    return np.sqrt((1 - ac) / ac)


def test_eps_table_endpoints_match_comfyui_float32():
    ms = EpsDiscrete()
    assert ms.sigmas.dtype == torch.float32
    assert ms.sigma_min == pytest.approx(0.029167158529162407, rel=1e-7)
    assert ms.sigma_max == pytest.approx(14.614641189575195, rel=1e-7)
    np.testing.assert_allclose(ms.sigmas.double().numpy(), eps_table64(), rtol=2e-6)


def test_eps_table_matches_diffusers_euler_discrete():
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    theirs = sched.sigmas[:-1].flip(0).double().numpy()  # descending + trailing 0 in diffusers
    # diffusers builds the table in float32
    np.testing.assert_allclose(EpsDiscrete().sigmas.double().numpy(), theirs, rtol=2e-5)


def test_flow_table_is_shifted_grid():
    ms = FlowConst(3.0)
    k = np.arange(1, 1001) / 1000
    np.testing.assert_allclose(ms.sigmas.double().numpy(), shift_fn(3.0, k), rtol=2e-6)
    assert ms.sigma_max == 1.0


@pytest.mark.parametrize("kind,shift", KINDS)
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_schedule_shape_and_endpoints(kind, shift, name):
    steps = 12
    s = sigmas(kind, name, steps, shift)
    ms = EpsDiscrete() if kind == "eps" else FlowConst(shift)
    assert s.dtype == torch.float32
    assert float(s[-1]) == 0.0
    assert bool((s[:-1] > 0).all()) and bool((s[1:] < s[:-1]).all()), s
    assert float(s[0]) == pytest.approx(ms.sigma_max, rel=1e-6)
    if name == "beta":
        assert len(s) <= steps + 1
    else:
        assert len(s) == steps + 1


def test_flow_normal_double_shifts_last_sigma_and_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = sigmas("flow", "normal", 30, 6.0)
    assert float(s[-2]) == pytest.approx(shift_fn(6.0, shift_fn(6.0, 0.001)), rel=1e-5)
    assert float(s[-2]) == pytest.approx(0.0347826, abs=1e-6)
    sched = FlowMatchEulerDiscreteScheduler(shift=6.0)
    sched.set_timesteps(30)
    np.testing.assert_allclose(s.numpy(), sched.sigmas.numpy(), atol=1e-6)


def test_flow_simple_is_shift_of_uniform_grid():
    s = sigmas("flow", "simple", 20, 3.0)
    expected = [shift_fn(3.0, (20 - x) / 20) for x in range(20)] + [0.0]
    np.testing.assert_allclose(s.numpy(), expected, rtol=2e-6)
    assert float(s[-2]) == pytest.approx(0.13636, abs=1e-5)


def test_eps_normal_is_log_linear_interpolation_of_table():
    table = np.log(eps_table64())
    steps = 7
    ts = np.linspace(999, 0, steps)
    lo, hi = np.floor(ts).astype(int), np.ceil(ts).astype(int)
    w = ts - lo
    expected = np.exp((1 - w) * table[lo] + w * table[hi])
    np.testing.assert_allclose(sigmas("eps", "normal", steps).numpy()[:-1], expected, rtol=1e-5)


def test_sgm_uniform_drops_last_of_n_plus_one():
    table = np.log(eps_table64())
    ts = np.linspace(999, 0, 5 + 1)[:-1]
    lo, hi = np.floor(ts).astype(int), np.ceil(ts).astype(int)
    w = ts - lo
    expected = np.exp((1 - w) * table[lo] + w * table[hi])
    np.testing.assert_allclose(sigmas("eps", "sgm_uniform", 5).numpy()[:-1], expected, rtol=1e-5)


def test_karras_closed_form_and_diffusers():
    from diffusers import EulerDiscreteScheduler

    s = sigmas("eps", "karras", 40)
    smin, smax = eps_table64()[0], eps_table64()[-1]
    ramp = np.linspace(0, 1, 40)
    expected = (smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    np.testing.assert_allclose(s.numpy()[:-1], expected, rtol=2e-6)
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", use_karras_sigmas=True
    )
    sched.set_timesteps(40)
    # diffusers builds its table in float32: <= 1.3e-5 relative (reference note §7.2)
    np.testing.assert_allclose(s.numpy(), sched.sigmas.numpy(), rtol=2e-5)


def test_exponential_is_log_uniform():
    s = sigmas("eps", "exponential", 10).double().numpy()[:-1]
    ratios = s[1:] / s[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)
    assert s[-1] == pytest.approx(eps_table64()[0], rel=1e-6)


def scipy_beta_indices(steps: int) -> list[int]:
    """ComfyUI's beta_scheduler indices, from scipy itself (consecutive duplicates dropped)."""
    from scipy.stats import beta as beta_dist

    raw = np.rint(beta_dist.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 999)
    return [int(t) for k, t in enumerate(raw) if k == 0 or t != raw[k - 1]]


@pytest.mark.parametrize("kind,shift", [*KINDS, ("flow", 3.0)])
def test_beta_matches_scipy_indices_for_every_step_count(kind, shift):
    ms = EpsDiscrete() if kind == "eps" else FlowConst(shift)
    for steps in range(1, 301):
        idx = scipy_beta_indices(steps)
        expected = [*ms.sigmas[idx].tolist(), 0.0]
        assert sigmas(kind, "beta", steps, shift).tolist() == expected, steps


def test_beta_middle_index_is_500_for_even_steps():
    # t = 0.5 -> ppf = 0.5 -> rint(499.5) = 500 (ComfyUI); a quantile a hair below 0.5 gives 499.
    for steps in (2, 30, 40, 100):
        s = sigmas("flow", "beta", steps, 1.0)
        assert float(s[steps // 2]) == pytest.approx(0.501, abs=1e-7), steps
    assert float(sigmas("eps", "beta", 30)[15]) == float(EpsDiscrete().sigmas[500])


def test_beta_rounds_to_table_and_ends_above_sigma_min():
    s = sigmas("flow", "beta", 30, 1.0)
    table = FlowConst(1.0).sigmas
    assert all(bool((table == v).any()) for v in s[:-1])  # every sigma is a table entry
    assert float(s[0]) == 1.0
    assert float(s[-2]) == pytest.approx(0.007, abs=1e-7)  # table[rint(ppf(1/30)*999)]
    assert float(s[-2]) == float(table[scipy_beta_indices(30)[-1]])


def test_beta_deduplicates_consecutive_indices():
    assert len(sigmas("flow", "beta", 138, 1.0)) - 1 == 138
    assert len(sigmas("flow", "beta", 139, 1.0)) - 1 == 138
    s = sigmas("eps", "beta", 200)
    assert len(s) - 1 < 200
    assert len(torch.unique(s)) == len(s)


def test_beta_shift_acts_through_table():
    s1, s6 = sigmas("flow", "beta", 10, 1.0), sigmas("flow", "beta", 10, 6.0)
    np.testing.assert_allclose(s6.numpy()[:-1], [shift_fn(6.0, float(v)) for v in s1[:-1]], rtol=1e-5)


def test_bad_names_are_errors():
    with pytest.raises(ValueError, match="unknown scheduler"):
        sigmas("eps", "ddim", 10)
    with pytest.raises(ValueError, match="prediction"):
        sigmas("v", "normal", 10)
    assert math.isfinite(float(sigmas("flow", "karras", 3, 2.0)[1]))
