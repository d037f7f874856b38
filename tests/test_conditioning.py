"""Conditioning equals diffusers' SDXL encode_prompt, chunk by chunk, on the tiny preset."""

from __future__ import annotations

import pytest
import torch

from bigasp.models.conditioning import Crop, Size, encode_prompts, encode_tokens, sdxl_time_ids
from bigasp.text import BOS, EOS, chunk_batch, tokenize
from bigasp.text.tokenizer import hf_clip_tokenizer


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from bigasp.models import component_config

    tok1, tok2 = hf_clip_tokenizer(), hf_clip_tokenizer(pad_token="!")
    sched = EulerDiscreteScheduler.from_config(component_config("tiny", "scheduler"))
    return StableDiffusionXLPipeline(
        vae=tiny_model.vae,
        text_encoder=tiny_model.text_encoder,
        text_encoder_2=tiny_model.text_encoder_2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=tiny_model.unet,
        scheduler=sched,
    )


def diffusers_encode(pipe, prompts):
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    return embeds, pooled


def ours(tiny_model, prompts, **kw):
    with torch.no_grad():
        return encode_prompts(tiny_model.text_encoder, tiny_model.text_encoder_2, prompts, **kw)


def encode_window(tiny_model, content):
    """Encode one 77-token window on its own, built by hand: (te1 hidden, te2 hidden, te2 pooled)."""
    ids1 = [BOS, *content, EOS] + [EOS] * (75 - len(content))
    ids2 = [BOS, *content, EOS] + [0] * (75 - len(content))
    with torch.no_grad():
        o1 = tiny_model.text_encoder(torch.tensor([ids1]), output_hidden_states=True)
        o2 = tiny_model.text_encoder_2(torch.tensor([ids2]), output_hidden_states=True)
    return o1.hidden_states[-2][0], o2.hidden_states[-2][0], o2.text_embeds[0]


SHORT = ["a photo of a cat", "a woman in a red dress walking along the beach at sunset, film grain", ""]


def test_up_to_75_tokens_equals_diffusers_encode_prompt(tiny_model, pipe):
    prompts = [*SHORT, "cat " * 75]
    assert len(tokenize(prompts)[-1]) == 75
    ref_embeds, ref_pooled = diffusers_encode(pipe, prompts)
    got = ours(tiny_model, prompts)
    width = tiny_model.text_encoder.config.hidden_size + tiny_model.text_encoder_2.config.hidden_size
    assert got.embeds.shape == ref_embeds.shape == (4, 77, width)
    assert got.pooled.shape == ref_pooled.shape == (4, tiny_model.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(got.embeds, ref_embeds)
    torch.testing.assert_close(got.pooled, ref_pooled)


def test_penultimate_layer_without_final_norm(tiny_model):
    got = ours(tiny_model, ["a photo of a cat"])
    ids = chunk_batch(tokenize(["a photo of a cat"])).te1[0]
    with torch.no_grad():
        out = tiny_model.text_encoder(ids, output_hidden_states=True)
    d1 = tiny_model.text_encoder.config.hidden_size
    torch.testing.assert_close(got.embeds[0, :, :d1], out.hidden_states[-2][0])
    assert not torch.allclose(got.embeds[0, :, :d1], out.last_hidden_state[0], atol=1e-3)


def test_long_prompt_each_window_equals_encoding_that_window_alone(tiny_model):
    long_text = ", ".join(f"detail {i}" for i in range(45))
    prompts = [long_text, "a photo of a cat", ""]
    ids = tokenize(prompts)
    assert 150 < len(ids[0]) <= 225
    got = ours(tiny_model, prompts, max_chunks=3)
    d1 = tiny_model.text_encoder.config.hidden_size
    assert got.embeds.shape[1] == 3 * 77
    for b, content in enumerate(ids):
        for k in range(3):
            h1, h2, _ = encode_window(tiny_model, content[75 * k : 75 * (k + 1)])
            window = got.embeds[b, 77 * k : 77 * (k + 1)]
            torch.testing.assert_close(window[:, :d1], h1)
            torch.testing.assert_close(window[:, d1:], h2)
        # pooled comes from the first chunk only
        _, _, pooled0 = encode_window(tiny_model, content[:75])
        torch.testing.assert_close(got.pooled[b], pooled0)
    _, _, pooled1 = encode_window(tiny_model, ids[0][75:150])
    assert not torch.allclose(got.pooled[0], pooled1, atol=1e-4)


def test_first_window_of_a_long_prompt_equals_diffusers_on_its_text(tiny_model, pipe):
    """diffusers truncates at 75 tokens: that is exactly our first window."""
    long_text = ", ".join(f"tag{i}" for i in range(80))
    assert len(tokenize([long_text])[0]) > 150
    ref_embeds, ref_pooled = diffusers_encode(pipe, [long_text])
    got = ours(tiny_model, [long_text])
    torch.testing.assert_close(got.embeds[:, :77], ref_embeds)
    torch.testing.assert_close(got.pooled, ref_pooled)


def test_empty_prompt_is_the_encoding_of_empty_string(tiny_model, pipe):
    got = ours(tiny_model, [""])
    ref_embeds, ref_pooled = diffusers_encode(pipe, [""])
    torch.testing.assert_close(got.embeds, ref_embeds)
    torch.testing.assert_close(got.pooled, ref_pooled)
    assert got.embeds.abs().sum() > 0 and got.pooled.abs().sum() > 0  # not zeroed embeddings
    h1, h2, pooled = encode_window(tiny_model, [])
    torch.testing.assert_close(got.embeds[0], torch.cat([h1, h2], dim=-1))
    torch.testing.assert_close(got.pooled[0], pooled)


def test_encode_tokens_matches_encode_prompts(tiny_model):
    prompts = ["a photo of a cat", "dog " * 90]
    with torch.no_grad():
        a = encode_tokens(tiny_model.text_encoder, tiny_model.text_encoder_2, chunk_batch(tokenize(prompts)))
    b = ours(tiny_model, prompts)
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.pooled, b.pooled)


# --- micro-conditioning ------------------------------------------------------------------


def test_time_ids_order_matches_diffusers(pipe):
    got = sdxl_time_ids(
        original_size=Size(height=1000, width=600),
        crop=Crop(top=10, left=20),
        target_size=Size(height=1216, width=832),
    )
    assert got.tolist() == [[1000, 600, 10, 20, 1216, 832]]
    proj = pipe.text_encoder_2.config.projection_dim
    ref = pipe._get_add_time_ids(
        (1000, 600), (10, 20), (1216, 832), torch.float32, text_encoder_projection_dim=proj
    )
    assert torch.equal(got, ref)


def test_time_ids_named_fields_cannot_be_swapped():
    a = sdxl_time_ids(
        original_size=Size(width=600, height=1000), crop=Crop(left=20, top=10), target_size=(1216, 832)
    )
    assert a.tolist() == [[1000, 600, 10, 20, 1216, 832]]
    with pytest.raises(TypeError):
        sdxl_time_ids(Size(1000, 600), Crop(10, 20), Size(1216, 832))  # keyword-only


def test_time_ids_batch_broadcast_and_tensors():
    got = sdxl_time_ids(
        original_size=[Size(1000, 600), Size(700, 900)],
        crop=Crop(0, 0),
        target_size=torch.tensor([[1024, 1024], [832, 1216]]),
    )
    assert got.tolist() == [[1000, 600, 0, 0, 1024, 1024], [700, 900, 0, 0, 832, 1216]]
    with pytest.raises(ValueError, match="crop has 2 entries"):
        sdxl_time_ids(original_size=[Size(1, 2)] * 3, crop=[Crop(0, 0)] * 2, target_size=Size(1, 2))
