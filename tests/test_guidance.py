"""CFG/PAG combination, PAG layer selection, identity attention, one batched UNet call per step."""

from __future__ import annotations

import pytest
import torch

from bigasp.sample.guidance import (
    Conditioning,
    GuidedDenoiser,
    IdentityAttentionProcessor,
    PerturbState,
    combine,
    pag_layer_names,
    perturbed_attention,
)
from bigasp.sample.model_sampling import EpsDiscrete, FlowConst


def test_pag_selects_exactly_the_ten_sdxl_mid_block_self_attentions():
    from bigasp.models import build_preset

    unet = build_preset("sdxl-base", ["unet"], device="meta").unet
    names = pag_layer_names(unet)
    assert names == [f"mid_block.attentions.0.transformer_blocks.{i}.attn1" for i in range(10)]


def test_combine_formula():
    dc, du, dp = torch.tensor([1.0]), torch.tensor([0.25]), torch.tensor([0.5])
    assert float(combine(dc, du, dp, cfg=3.0, pag=2.0)) == pytest.approx(0.25 + 3 * 0.75 + 2 * 0.5)
    assert float(combine(dc, du, None, cfg=3.0, pag=2.0)) == pytest.approx(0.25 + 3 * 0.75)
    assert float(combine(dc, None, dp, cfg=1.0, pag=2.0)) == pytest.approx(1.0 + 2 * 0.5)
    assert float(combine(dc, du, dp, cfg=3.0, pag=0.0)) == pytest.approx(2.5)


def test_identity_attention_processor_rows():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    h = torch.randn(4, 5, 16)
    state = PerturbState()
    proc = IdentityAttentionProcessor(AttnProcessor2_0(), state)
    attn.set_processor(proc)
    with torch.no_grad():
        normal = AttnProcessor2_0()(attn, h)
        state.start = 2
        out = attn(h)
        identity = attn.to_out[0](attn.to_v(h))
    torch.testing.assert_close(out[:2], normal[:2])
    torch.testing.assert_close(out[2:], identity[2:])
    assert not torch.allclose(normal[2:], identity[2:])


@pytest.fixture(scope="module")
def unet(tiny_model):
    return tiny_model.unet


def _cond(unet, b: int, chunks: int, seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    c = unet.config.cross_attention_dim
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return Conditioning(
        embeds=torch.randn(b, 77 * chunks, c, generator=g),
        pooled=torch.randn(b, pooled_dim, generator=g),
        time_ids=torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(b, 1),
    )


def _count_calls(unet):
    calls = []
    handle = unet.register_forward_pre_hook(
        lambda m, args, kw: calls.append(args[0].shape[0]), with_kwargs=True
    )
    return calls, handle


def _separate(unet, ms, c: Conditioning, x, sigma, perturbed: bool):
    t = torch.full((x.shape[0],), float(ms.timestep(torch.tensor(sigma))))
    state = PerturbState()
    with perturbed_attention(unet, state):
        state.start = 0 if perturbed else None
        out = unet(x * ms.input_scale(sigma), t, encoder_hidden_states=c.embeds,
                   added_cond_kwargs={"text_embeds": c.pooled, "time_ids": c.time_ids}).sample  # fmt: skip
    return ms.denoised(sigma, out, x)


@pytest.mark.parametrize("ms", [EpsDiscrete(), FlowConst(1.0)], ids=["eps", "flow"])
def test_one_batched_call_equals_separate_passes(unet, ms):
    b = 2
    cond, uncond = _cond(unet, b, 1, 1), _cond(unet, b, 2, 2)  # 1 vs 2 chunks: repeated to 2
    x = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = 0.7 if ms.prediction == "flow" else 3.0
    den = GuidedDenoiser(unet, ms, cond, uncond, cfg=3.0, pag=2.0)
    calls, handle = _count_calls(unet)
    try:
        with torch.no_grad(), perturbed_attention(unet, den.state):
            d = den(x, sigma)
    finally:
        handle.remove()
    assert calls == [3 * b]  # cond + uncond + perturbed in ONE call
    with torch.no_grad():
        dc = _separate(unet, ms, cond, x, sigma, False)
        du = _separate(unet, ms, uncond, x, sigma, False)
        dp = _separate(unet, ms, cond, x, sigma, True)
    assert not torch.allclose(dc, dp, atol=1e-4)  # the perturbation does something
    torch.testing.assert_close(d, du + 3.0 * (dc - du) + 2.0 * (dc - dp), rtol=1e-4, atol=1e-5)


def test_sampling_loop_makes_one_unet_call_per_step(unet):
    from bigasp.sample.samplers import sample_euler

    ms = FlowConst(1.0)
    den = GuidedDenoiser(unet, ms, _cond(unet, 1, 1, 1), _cond(unet, 1, 1, 2), cfg=4.0, pag=2.0)
    calls, handle = _count_calls(unet)
    try:
        with perturbed_attention(unet, den.state):
            sample_euler(den, torch.randn(1, 4, 8, 8), [1.0, 0.6, 0.3, 0.0])
    finally:
        handle.remove()
    assert calls == [3, 3, 3] and den.unet_calls == 3


def test_incompatible_lengths_split_and_cfg1_skips_uncond(unet):
    ms = FlowConst(1.0)
    x = torch.randn(1, 4, 8, 8)
    den = GuidedDenoiser(unet, ms, _cond(unet, 1, 5, 1), _cond(unet, 1, 1, 2), cfg=3.0, pag=2.0)
    calls, handle = _count_calls(unet)
    try:
        with torch.no_grad(), perturbed_attention(unet, den.state):
            den(x, 0.5)
        calls_split = list(calls)
        calls.clear()
        den1 = GuidedDenoiser(unet, ms, _cond(unet, 1, 1, 1), None, cfg=1.0, pag=0.0)
        with torch.no_grad():
            d = den1(x, 0.5)
    finally:
        handle.remove()
    assert calls_split == [2, 1]  # LCM ratio 5 > 4: cond+perturbed, then uncond
    assert calls == [1]
    with torch.no_grad():
        torch.testing.assert_close(d, _separate(unet, ms, _cond(unet, 1, 1, 1), x, 0.5, False))


def test_processors_restored(unet):
    before = {n: type(m.processor) for n, m in unet.named_modules() if hasattr(m, "processor")}
    with perturbed_attention(unet, PerturbState()) as names:
        assert len(names) == 2  # tiny preset: 2 transformer layers in the mid block
        assert all(
            isinstance(dict(unet.named_modules())[n].processor, IdentityAttentionProcessor) for n in names
        )
    after = {n: type(m.processor) for n, m in unet.named_modules() if hasattr(m, "processor")}
    assert before == after


@pytest.mark.parametrize("ms", [EpsDiscrete(), FlowConst(1.0)], ids=["eps", "flow"])
def test_guided_unet_call_never_reads_device_values(unet, ms, host_sync_trap):
    """CPU twin of the CUDA sync-debug test: nothing derived from x is read on the host."""

    den = GuidedDenoiser(unet, ms, _cond(unet, 1, 1, 1), _cond(unet, 1, 2, 2), cfg=3.0, pag=2.0)
    x = torch.randn(1, 4, 8, 8).as_subclass(host_sync_trap)
    with torch.no_grad(), perturbed_attention(unet, den.state):
        assert isinstance(den(x, 0.5), host_sync_trap)
