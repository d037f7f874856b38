r"""Prompt chunking and `embedding:NAME` exactly as ComfyUI's `SDTokenizer.tokenize_with_weights`.

The expected chunks were produced by running ComfyUI's tokenizer logic (comfy/sd1_clip.py:
token_weights, tokenize_with_weights, load_embed) with transformers' CLIPTokenizer on the
shipped vocabulary and an embedding folder holding `sub/myemb.safetensors` with 3 vectors:
content tokens of each 77-token chunk (BOS/EOS/padding left out), an embedding vector as "E<row>".

Where an embedding may start: ComfyUI splits a weighted segment with
`re.split(r'(?<=\s){}'.format(re.escape(self.embedding_identifier)), ...)` (Comfy-Org/ComfyUI
comfy/sd1_clip.py @ 443393b48e19da8601fb947eea05b5d57574cc7a and @ 4bd7a4004ab8bf0e516222036dc97733ddf3aa74,
`SDTokenizer.tokenize_with_weights`): at a segment start or after any whitespace, a tab included.
(An older revision, @ a125cd84b054a57729b5eecab930ca9408719832 of 2025-10-11, split on a space or a
newline only; bigasp follows the current one.)
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import save_file

from bigasp.sample.embeddings import EmbeddingLibrary, EmbeddingVector
from bigasp.sample.prompts import encode_weighted, prompt_chunks, weighted_tokens

CAT = [(2368, 1.0), (267, 1.0)]  # "cat,"
COMFYUI = {
    "small_group_moves": ("cat, " * 37 + "(big red hat:1.3) dog", [
        CAT * 37,
        [(1205, 1.3), (736, 1.3), (3801, 1.3), (1929, 1.0)],
    ]),
    "large_group_splits": ("cat, " * 35 + "(a very long weighted phrase about a red hat and a blue coat:1.2) dog", [
        CAT * 35 + [(320, 1.2), (1070, 1.2), (1538, 1.2), (43179, 1.2), (18809, 1.2)],
        [(781, 1.2), (320, 1.2), (736, 1.2), (3801, 1.2), (537, 1.2), (320, 1.2), (1746, 1.2), (7356, 1.2),
         (1929, 1.0)],
    ]),
    "plain_long": ("cat, " * 80, [CAT * 37 + CAT[:1], CAT[1:] + CAT * 37, CAT * 5]),
    "nested_escaped": ("a \\(literal\\) ((nested) (x:0.5)) [plain] (unclosed", [
        [(320, 1.0), (263, 1.0), (24269, 1.0), (264, 1.0), (557, 1.21), (1356, 1.21), (343, 0.5), (314, 1.0),
         (10709, 1.0), (316, 1.0), (263, 1.0), (569, 1.0), (4552, 1.0)],
    ]),
    "embedding": ("a photo of embedding:myemb, cat", [
        [(320, 1.0), (1125, 1.0), (539, 1.0), ("E0", 1.0), ("E1", 1.0), ("E2", 1.0), (267, 1.0), (2368, 1.0)],
    ]),
    "embedding_missing": ("a embedding:nothere, (b:1.2) embedding:sub/myemb", [
        [(320, 1.0), (267, 1.0), (321, 1.2), ("E0", 1.0), ("E1", 1.0), ("E2", 1.0)],
    ]),
    "embedding_crosses": ("cat, " * 37 + "embedding:myemb dog", [
        CAT * 37,
        [("E0", 1.0), ("E1", 1.0), ("E2", 1.0), (1929, 1.0)],
    ]),
    "embedding_after_newline": ("a\nembedding:myemb cat", [
        [(320, 1.0), ("E0", 1.0), ("E1", 1.0), ("E2", 1.0), (2368, 1.0)],
    ]),
    "embedding_after_tab": ("a\tembedding:myemb cat", [
        [(320, 1.0), ("E0", 1.0), ("E1", 1.0), ("E2", 1.0), (2368, 1.0)],
    ]),
    "embedding_after_comma_is_text": ("a,embedding:myemb cat", [
        [(320, 1.0), (267, 1.0), (19703, 1.0), (796, 1.0), (281, 1.0), (27551, 1.0), (3996, 1.0), (2368, 1.0)],
    ]),
    "embedding_mid_word": ("a,embedding:myemb (x embedding:myemb[y]:1.1)", [
        [(320, 1.0), (267, 1.0), (19703, 1.0), (796, 1.0), (281, 1.0), (27551, 1.0), (3996, 1.0), (343, 1.1),
         ("E0", 1.1), ("E1", 1.1), ("E2", 1.1), (314, 1.1), (344, 1.1), (316, 1.1)],
    ]),
}  # fmt: skip


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    """`sub/myemb.safetensors`: 3 vectors per encoder, sized for the tiny encoders."""
    folder = tmp_path_factory.mktemp("embeddings")
    (folder / "sub").mkdir()
    g = torch.Generator().manual_seed(0)
    w1 = tiny_model.text_encoder.get_input_embeddings().weight.shape[1]
    w2 = tiny_model.text_encoder_2.get_input_embeddings().weight.shape[1]
    save_file({"clip_l": torch.randn(3, w1, generator=g), "clip_g": torch.randn(3, w2, generator=g)},
              str(folder / "sub" / "myemb.safetensors"))  # fmt: skip
    return EmbeddingLibrary(folder)


def as_comfy(chunks):
    return [[(f"E{t.row}" if isinstance(t, EmbeddingVector) else t, pytest.approx(w)) for t, w in zip(*c, strict=True)]
            for c in chunks]  # fmt: skip


@pytest.mark.parametrize("case", sorted(COMFYUI))
def test_chunks_equal_comfyui_tokenize_with_weights(case, library):
    text, expected = COMFYUI[case]
    assert as_comfy(prompt_chunks(text, "comfy", "comfy", library)) == expected


def test_bigasp_chunking_stays_the_plain_training_split(library):
    text, _ = COMFYUI["small_group_moves"]
    assert [len(c[0]) for c in prompt_chunks(text, "comfy", "bigasp")] == [75, 3]


def test_padding_per_encoder_matches_comfyui(library):
    """ComfyUI pads clip_l chunks with EOS and clip_g chunks with 0 after the EOS."""
    wt = weighted_tokens([COMFYUI["small_group_moves"][0]], embeddings=library)
    te1, te2 = wt.tokens.te1[0], wt.tokens.te2[0]
    assert te1[0, 75].item() == 49407 and te1[0, 76].item() == 49407  # 74 content + EOS + 1 pad
    assert te2[0, 75].item() == 49407 and te2[0, 76].item() == 0
    assert int((te2[1] == 0).sum()) == 71  # BOS + 4 + EOS + 71 pads (ComfyUI: 71)
    assert wt.weights[0, 1, 1:4].tolist() == pytest.approx([1.3] * 3) and wt.weights[0, 1, 4] == 1.0


def test_missing_embedding_is_dropped_with_a_warning(library, caplog):
    with caplog.at_level(logging.WARNING):
        chunks = prompt_chunks("a embedding:nothere cat", "comfy", "comfy", library)
    assert "embedding:nothere does not exist, ignoring" in caplog.text
    assert as_comfy(chunks) == [[(320, 1.0), (2368, 1.0)]]
    with caplog.at_level(logging.WARNING):
        prompt_chunks("embedding:x", "comfy", "comfy", EmbeddingLibrary(None))
    assert "pass --embeddings DIR" in caplog.text


def test_embedding_vectors_are_encoded_as_extra_vocabulary(tiny_model, library):
    """Reference: the same vectors appended to each encoder's vocabulary as new token ids,
    encoded the usual way (how diffusers loads textual inversions)."""
    from bigasp.models.conditioning import encode_tokens

    te1, te2 = copy.deepcopy(tiny_model.text_encoder), copy.deepcopy(tiny_model.text_encoder_2)
    ours = encode_weighted(te1, te2, ["a photo of embedding:myemb, cat"], "comfy", "comfy", library)
    wt = weighted_tokens(["a photo of embedding:myemb, cat"], embeddings=library)
    ids1, ids2 = wt.tokens.te1.clone(), wt.tokens.te2.clone()
    for enc, key, ids in ((te1, "clip_l", ids1), (te2, "clip_g", ids2)):
        n = enc.get_input_embeddings().weight.shape[0]
        enc.resize_token_embeddings(n + 3)
        with torch.no_grad():
            enc.get_input_embeddings().weight[n:] = library.vectors("myemb", key)
        for _, k, pos, ref in wt.vectors:
            ids[0, k, pos] = n + ref.row
    ref_tokens = type(wt.tokens)(ids1, ids2, wt.tokens.n_tokens, 0)
    with torch.no_grad():
        ref = encode_tokens(te1, te2, ref_tokens)
    torch.testing.assert_close(ours.embeds, ref.embeds)
    plain = encode_weighted(tiny_model.text_encoder, tiny_model.text_encoder_2, ["a photo of, cat"], "comfy")
    assert not torch.allclose(ours.embeds[:, :8], plain.embeds[:, :8])


def test_generate_uses_the_embeddings_folder(library):
    from bigasp.models import ModelKind, build_preset
    from bigasp.sample import GenerateSettings, Generator

    gen = Generator(build_preset("tiny", seed=0, kind=ModelKind("flow", 1.0)), "cpu", torch.float32)
    s = GenerateSettings.from_preset("bigasp-v2.5", width=64, height=64, steps=1, cfg=1.0, pag=0.0,
                                     embeddings=str(library.folder))  # fmt: skip
    with_emb = gen.conditioning(["a photo of embedding:myemb"], s).embeds
    without = gen.conditioning(
        ["a photo of embedding:myemb"], s.model_copy(update={"embeddings": None})
    ).embeds
    assert not torch.allclose(with_emb, without)


def test_vector_of_the_wrong_width_is_skipped_and_the_chunk_padded_at_its_end(tiny_model, tmp_path, caplog):
    """A one-tensor file (no clip_l/clip_g keys) whose width fits no encoder: ComfyUI skips it for
    each encoder and pads the chunk at its end, so the encoders see the prompt without it."""
    te1, te2 = tiny_model.text_encoder, tiny_model.text_encoder_2
    width = te1.get_input_embeddings().weight.shape[1] + 1
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(1))},
              str(tmp_path / "one.safetensors"))  # fmt: skip
    lib = EmbeddingLibrary(tmp_path)
    with caplog.at_level(logging.WARNING):
        ours = encode_weighted(te1, te2, ["a photo of embedding:one, (cat:1.2)"], "comfy", "comfy", lib)
    assert "ignored for that encoder" in caplog.text
    # same ids as the prompt without the embedding; the weights stay at their original positions
    wt = weighted_tokens(["a photo of embedding:one, (cat:1.2)"], embeddings=lib)
    assert wt.weights[0, 0, 1:10].tolist() == pytest.approx([1, 1, 1, 1, 1, 1, 1.2, 1, 1])
    from bigasp.models.conditioning import encode_tokens
    from bigasp.sample.prompts import apply_weights_comfy

    plain = weighted_tokens(["a photo of, cat"], "none")
    z = encode_tokens(te1, te2, plain.tokens).embeds
    z_empty = encode_tokens(te1, te2, weighted_tokens([""], "none").tokens).embeds
    expected = apply_weights_comfy(z, z_empty, wt.weights.reshape(1, -1))
    torch.testing.assert_close(ours.embeds, expected)
