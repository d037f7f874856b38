"""Single-file SDXL (.safetensors, original SGM/LDM key names): export, then load through diffusers.

The round trip writes with bigasp's own diffusers->SGM mapping and reads with diffusers'
single-file converters, so agreement bit for bit means the two mappings are each other's
inverse. The sdxl-base checks run on the meta device (shapes only, no memory).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bigasp.errors import ModelLoadError
from bigasp.models import SDXL, ModelKind, build_preset
from bigasp.models.io import load_model
from bigasp.models.single_file import (
    META_FORMAT,
    META_KIND,
    PREFIXES,
    clip_g_to_ldm,
    component_to_ldm,
    ldm_state_dict,
    load_single_file,
    save_single_file,
    unet_to_ldm,
    vae_to_ldm,
)


@pytest.fixture(scope="module")
def distinct_model(tiny_model) -> SDXL:
    """The tiny model with every tensor filled with distinct random values.

    Freshly initialised norms are all ones and biases all zeros; a mapping that swapped two
    of them would go unnoticed. Random values make every misplacement visible.
    """
    model = copy.deepcopy(tiny_model)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for module in model.modules().values():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
    model.kind = ModelKind(prediction="flow", shift=3.0)
    return model


@pytest.fixture(scope="module")
def tiny_file(distinct_model, tmp_path_factory):
    return save_single_file(distinct_model, tmp_path_factory.mktemp("sf") / "tiny.safetensors")


def assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_is_bitwise_identical_for_all_components(distinct_model, tiny_file):
    loaded = load_single_file(tiny_file)
    for comp in SDXL.COMPONENTS:
        assert_identical(getattr(distinct_model, comp), getattr(loaded, comp))
    assert loaded.kind == ModelKind(prediction="flow", shift=3.0)
    assert loaded.source == str(tiny_file)
    assert all(not m.training for m in loaded.modules().values())


def test_file_layout_and_metadata(tiny_file):
    with safe_open(str(tiny_file), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert all(k.startswith(tuple(PREFIXES.values())) for k in keys)
    for prefix in PREFIXES.values():
        assert any(k.startswith(prefix) for k in keys)
    # a few tiny-preset names in SGM layout (2 levels, 1 layer per block)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "first_stage_model.decoder.up.0.block.1.conv2.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.ln_final.weight",
    ):
        assert key in keys, key
    assert meta[META_FORMAT] == "1"
    kind = json.loads(meta[META_KIND])
    assert kind["prediction"] == "flow" and kind["shift"] == 3.0


def test_load_reads_only_requested_components(tiny_file, monkeypatch, distinct_model):
    from bigasp.models.single_file import TensorReader

    real_read = TensorReader.read
    read: list[str] = []

    def recording(self, key, *a, **kw):
        read.append(key)
        return real_read(self, key, *a, **kw)

    monkeypatch.setattr(TensorReader, "read", recording)
    m = load_single_file(tiny_file, ["text_encoder_2"])
    assert m.unet is None and m.vae is None and m.text_encoder is None
    assert read and all(k.startswith(PREFIXES["text_encoder_2"]) for k in read)
    assert_identical(m.text_encoder_2, distinct_model.text_encoder_2)


def test_load_model_dispatches_single_files(tiny_file, distinct_model):
    m = load_model(tiny_file, ["vae"], kind=ModelKind("eps"))
    assert_identical(m.vae, distinct_model.vae)
    assert m.kind == ModelKind("eps")  # an explicit kind overrides the recorded one


def test_files_without_bigasp_metadata_are_eps_and_extra_keys_are_ignored(distinct_model, tmp_path):
    """A Civitai-style file: no bigasp metadata, plus non-parameter keys real releases carry."""
    tensors = {k: v.contiguous() for k, v in ldm_state_dict(distinct_model).items()}
    tensors["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    tensors["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    tensors["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
    path = tmp_path / "civitai.safetensors"
    save_file(tensors, str(path), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    m = load_single_file(path, ["unet", "text_encoder"])
    assert m.kind == ModelKind("eps", 1.0)
    assert_identical(m.unet, distinct_model.unet)
    assert_identical(m.text_encoder, distinct_model.text_encoder)
    assert load_single_file(path, ["unet"], kind=ModelKind("flow", 2.0)).kind == ModelKind("flow", 2.0)


def test_half_precision_file(distinct_model, tmp_path):
    half = SDXL(text_encoder=copy.deepcopy(distinct_model.text_encoder).half())
    path = save_single_file(half, tmp_path / "half.safetensors")
    m = load_single_file(path, ["text_encoder"])
    for k, v in distinct_model.text_encoder.state_dict().items():
        assert torch.equal(m.text_encoder.state_dict()[k], v.half().float()), k


# --- preset inference and errors --------------------------------------------------------


def test_shape_mismatch_names_the_key_and_suggests_preset(distinct_model, tmp_path):
    tensors = {k: v.contiguous() for k, v in component_to_ldm("unet", distinct_model.unet).items()}
    tensors["model.diffusion_model.out.2.weight"] = torch.zeros(8, 32, 3, 3)
    path = tmp_path / "odd.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ModelLoadError, match="--arch") as err:
        load_single_file(path, ["unet"])
    assert "model.diffusion_model.out.2.weight" in str(err.value)
    with pytest.raises(ModelLoadError, match="does not match preset 'tiny'"):
        load_single_file(path, ["unet"], preset="tiny")


def test_wrong_explicit_preset_and_unknown_preset(tiny_file):
    with pytest.raises(ModelLoadError, match="does not match preset 'sdxl-base'"):
        load_single_file(tiny_file, ["text_encoder"], preset="sdxl-base")
    with pytest.raises(ModelLoadError, match="unknown preset 'sd15'"):
        load_single_file(tiny_file, ["text_encoder"], preset="sd15")


def test_missing_component_is_a_clear_error(distinct_model, tmp_path):
    path = save_single_file(SDXL(unet=distinct_model.unet), tmp_path / "unet_only.safetensors")
    assert load_single_file(path, ["unet"]).vae is None
    with pytest.raises(ModelLoadError, match=r"has no vae weights .*first_stage_model"):
        load_single_file(path, ["vae"])


def test_diffusers_component_file_is_not_mistaken_for_a_single_file(distinct_model, tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in distinct_model.vae.state_dict().items()}, str(path))
    with pytest.raises(ModelLoadError, match="pass the folder instead"):
        load_single_file(path, ["vae"])


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelLoadError, match=r"not a readable \.safetensors"):
        load_single_file(bad)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_single_file(tmp_path / "nope.safetensors")


def test_save_is_atomic_and_keeps_the_old_file_on_failure(distinct_model, tmp_path, monkeypatch):
    import bigasp.models.single_file as sf

    small = SDXL(text_encoder=distinct_model.text_encoder)
    out = save_single_file(small, tmp_path / "m.safetensors")
    before = out.read_bytes()
    materialize, calls = sf._materialize, []

    def boom(*a, **kw):  # fails midway: some tensors are already in the temp file
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return materialize(*a, **kw)

    monkeypatch.setattr(sf, "_materialize", boom)
    with pytest.raises(OSError, match="disk full"):
        save_single_file(small, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    with pytest.raises(ModelLoadError, match=r"must end in \.safetensors"):
        save_single_file(small, tmp_path / "m.ckpt")


# --- the real SDXL layout, on the meta device ----------------------------------------------


@pytest.fixture(scope="module")
def sdxl_meta() -> SDXL:
    return build_preset("sdxl-base", device="meta")


@pytest.fixture(scope="module")
def sdxl_ldm(sdxl_meta) -> dict[str, torch.Tensor]:
    return ldm_state_dict(sdxl_meta)


# (key, shape) pairs as they appear in sd_xl_base_1.0.safetensors and its finetunes
KNOWN_SDXL_KEYS = {
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (640, 640),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.6.0.op.weight": (640, 640, 3, 3),
    "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280),
    "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.time_embed.2.weight": (1280, 1280),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.bias": (1280,),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
}


def test_sdxl_base_key_names_and_shapes(sdxl_ldm):
    for key, shape in KNOWN_SDXL_KEYS.items():
        assert key in sdxl_ldm, key
        assert tuple(sdxl_ldm[key].shape) == shape, key
    for absent in (
        "model.diffusion_model.input_blocks.1.1.norm.weight",  # level 0 has no attention in SDXL
        "model.diffusion_model.output_blocks.8.1.norm.weight",
        "model.diffusion_model.input_blocks.9.0.in_layers.0.weight",
        "first_stage_model.decoder.up.0.upsample.conv.weight",
    ):
        assert absent not in sdxl_ldm


def test_sdxl_base_key_counts(sdxl_meta, sdxl_ldm):
    """UNet, VAE and CLIP-L map one to one; bigG fuses q/k/v weight+bias (6 -> 2) in 32 layers."""
    counts = {c: sum(k.startswith(p) for k in sdxl_ldm) for c, p in PREFIXES.items()}
    diffusers_counts = {c: len(m.state_dict()) for c, m in sdxl_meta.modules().items()}
    assert diffusers_counts == {"unet": 1680, "vae": 248, "text_encoder": 196, "text_encoder_2": 517}
    assert counts == {"unet": 1680, "vae": 248, "text_encoder": 196, "text_encoder_2": 517 - 32 * 4}
    assert len(sdxl_ldm) == 2513


def test_diffusers_recognises_the_layout_as_sdxl_base(sdxl_ldm):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    assert infer_diffusers_model_type(sdxl_ldm) == "xl_base"


def test_sdxl_base_mapping_is_the_inverse_of_diffusers_converters(sdxl_meta):
    """On the real architecture every tensor must come back to the parameter it left from."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    def prefixed(comp, mapped):
        return {PREFIXES[comp] + k: v for k, v in mapped.items()}

    unet_sd = sdxl_meta.unet.state_dict()
    ldm = prefixed("unet", unet_to_ldm(unet_sd, sdxl_meta.unet.config))
    back = convert_ldm_unet_checkpoint(ldm, dict(sdxl_meta.unet.config))
    assert back.keys() == unet_sd.keys()
    assert all(back[k] is unet_sd[k] for k in unet_sd)  # UNet keys are pure renames: same objects

    vae_sd = sdxl_meta.vae.state_dict()
    ldm = prefixed("vae", vae_to_ldm(vae_sd, sdxl_meta.vae.config))
    back = convert_ldm_vae_checkpoint(ldm, dict(sdxl_meta.vae.config))
    assert back.keys() == vae_sd.keys()
    assert all(back[k].shape == vae_sd[k].shape for k in vae_sd)
    assert all(back[k] is vae_sd[k] for k in vae_sd if "mid_block.attentions" not in k)

    te2_sd = sdxl_meta.text_encoder_2.state_dict()
    ldm = prefixed("text_encoder_2", clip_g_to_ldm(te2_sd))
    back = convert_open_clip_checkpoint(sdxl_meta.text_encoder_2, ldm, PREFIXES["text_encoder_2"])
    assert back.keys() == te2_sd.keys()
    assert all(back[k].shape == te2_sd[k].shape for k in te2_sd)
    untouched = [k for k in te2_sd if "_proj." not in k or "out_proj" in k]
    assert all(back[k] is te2_sd[k] for k in untouched if k != "text_projection.weight")


def test_presets_with_equal_shapes_but_different_configs_are_ambiguous(tiny_file, monkeypatch):
    """Two presets can share every tensor shape yet differ (head counts): never guess between them."""
    from bigasp.models import single_file

    real_shapes, real_config = single_file.expected_shapes, single_file._config_sans_meta
    twin = "tiny-twin"  # a hypothetical second preset with tiny's shapes
    twin_config = {"attention_head_dim": 99}
    monkeypatch.setattr(single_file, "PRESETS", (*single_file.PRESETS, twin))
    monkeypatch.setattr(
        single_file, "expected_shapes", lambda p, c: real_shapes("tiny" if p == twin else p, c)
    )
    monkeypatch.setattr(
        single_file,
        "_config_sans_meta",
        lambda p, c: {**real_config("tiny", c), **twin_config} if p == twin else real_config(p, c),
    )
    with pytest.raises(ModelLoadError, match=r"fits several presets.*tiny-twin.*--arch"):
        load_single_file(tiny_file, ["unet"])
    assert load_single_file(tiny_file, ["unet"], preset="tiny").unet is not None

    twin_config.clear()  # same shapes AND same config: nothing to choose, so it loads
    assert load_single_file(tiny_file, ["unet"]).unet is not None


def test_vae_attention_stored_as_matrices_also_loads(distinct_model, tmp_path):
    """Some converters write the VAE mid-block attention as [C, C] instead of 1x1 convs."""
    tensors = {k: v.contiguous() for k, v in component_to_ldm("vae", distinct_model.vae).items()}
    squeezed = [k for k in tensors if ".mid.attn_1." in k and tensors[k].ndim == 4]
    assert len(squeezed) == 8  # q, k, v, proj_out in encoder and decoder
    for k in squeezed:
        tensors[k] = tensors[k][:, :, 0, 0].contiguous()
    path = tmp_path / "vae2d.safetensors"
    save_file(tensors, str(path))
    assert_identical(load_single_file(path, ["vae"], preset="tiny").vae, distinct_model.vae)
    assert_identical(load_single_file(path, ["vae"]).vae, distinct_model.vae)


# --- export one tensor at a time ------------------------------------------------------------


def _save_file_reference(model: SDXL, path, dtype: torch.dtype | None) -> None:
    """The export as it was: every output tensor built first, then `safetensors.torch.save_file`."""
    from bigasp.models.single_file import file_metadata

    tensors = {
        k: v.detach().to(dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
        for k, v in ldm_state_dict(model).items()
    }
    save_file(tensors, str(path), metadata=file_metadata(model))


def assert_same_file(ours, ref) -> None:
    """Same header (tensor names, dtypes, shapes, data offsets, metadata) and the same data bytes.
    Only the order of the metadata keys inside the header may differ: safetensors writes them in
    hash order, which changes from one process to the next."""
    import struct

    a, b = ours.read_bytes(), ref.read_bytes()
    (na,), (nb,) = struct.unpack("<Q", a[:8]), struct.unpack("<Q", b[:8])
    assert na == nb and len(a) == len(b)
    assert json.loads(a[8 : 8 + na]) == json.loads(b[8 : 8 + nb])
    assert a[8 + na :] == b[8 + nb :]
    ours_keys, ref_keys = list(json.loads(a[8 : 8 + na])), list(json.loads(b[8 : 8 + nb]))
    assert ours_keys == ref_keys  # "__metadata__" first, then the tensors in data order


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, None])
def test_streamed_export_writes_what_safetensors_save_file_wrote(distinct_model, tmp_path, dtype):
    ours = save_single_file(distinct_model, tmp_path / "ours.safetensors", dtype=dtype)
    _save_file_reference(distinct_model, tmp_path / "ref.safetensors", dtype)
    assert_same_file(ours, tmp_path / "ref.safetensors")


def test_safetensors_writer_orders_mixed_dtypes_as_safetensors_does(tmp_path):
    from bigasp.models.single_file import write_safetensors

    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"{name}.{i}": torch.randn(3 + i, generator=gen).to(dt) if dt.is_floating_point else
        torch.arange(5 + i).to(dt)
        for i, (name, dt) in enumerate(
            [("b", torch.float16), ("a", torch.bfloat16), ("z", torch.float32), ("c", torch.int64),
             ("y", torch.float64), ("x", torch.int32), ("w", torch.int16), ("v", torch.int8),
             ("u", torch.uint8), ("t", torch.bool), ("s", torch.float16), ("r", torch.float32)]
        )
    }  # fmt: skip
    tensors["scalar"] = torch.tensor(4.5)
    meta = {"z": "1", "a": "ü", "m": "x" * 7}
    write_safetensors(tmp_path / "ours.safetensors", {**tensors, "lazy": lambda: torch.ones(2, 3)}, meta)
    save_file({**tensors, "lazy": torch.ones(2, 3)}, str(tmp_path / "ref.safetensors"), metadata=meta)
    assert_same_file(tmp_path / "ours.safetensors", tmp_path / "ref.safetensors")


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of the tensors torch ops create while they are alive, and the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _gone(self, ptr: int, nbytes: int) -> None:
        self.seen.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if nbytes == 0 or any(
                    isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr
                    for a in torch.utils._pytree.tree_leaves((args, kwargs))
                ):
                    continue  # a view or the input itself: no new memory
                self.seen.add(ptr)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._gone, ptr, nbytes)
        return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_export_holds_one_output_tensor_at_a_time(distinct_model, tmp_path, dtype):
    """The memory an export adds to the loaded model is one output tensor (plus one fused q/k/v
    source), counted by what torch allocates, not by timing: the old path held every cast tensor."""
    state = ldm_state_dict(distinct_model)
    largest_out = max(v.numel() for v in state.values()) * dtype.itemsize
    fused = max(v.numel() * 4 for k, v in state.items() if k.endswith(("in_proj_weight", "text_projection")))
    total = sum(v.numel() for v in state.values()) * dtype.itemsize
    bound = largest_out + fused
    assert total > 2 * bound  # the bound below tells the two paths apart
    with LiveBytes() as ours:
        save_single_file(distinct_model, tmp_path / "ours.safetensors", dtype=dtype)
    with LiveBytes() as old:
        _save_file_reference(distinct_model, tmp_path / "ref.safetensors", dtype)
    assert old.peak >= total  # the tracker sees the old path's copies
    assert ours.peak <= bound, (ours.peak, bound, old.peak)


# --- loading: against diffusers' converters, and without a second copy ------------------------


def _diffusers_reference(path, component: str, tmp_path) -> torch.nn.Module:
    """The component as diffusers' own single-file converters load it (the field's reference)."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    from bigasp.models.presets import component_config

    cfg = component_config("tiny", component)
    for key in ("architectures", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    (tmp_path / component).mkdir()
    (tmp_path / component / "config.json").write_text(json.dumps(cfg))
    with safe_open(str(path), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith(PREFIXES[component])}  # noqa: SIM118
    where = str(tmp_path / component)
    if component in ("unet", "vae"):
        cls = diffusers.UNet2DConditionModel if component == "unet" else diffusers.AutoencoderKL
        return cls.from_single_file(sd, config=where, local_files_only=True)
    cls = (
        transformers.CLIPTextModel
        if component == "text_encoder"
        else transformers.CLIPTextModelWithProjection
    )
    return create_diffusers_clip_model_from_ldm(cls, sd, config=where, local_files_only=True).float()


@pytest.mark.parametrize("half", [False, True])
def test_loading_matches_diffusers_single_file_converters(distinct_model, tmp_path, half):
    """Every component loads as diffusers' converters load the same file (fp32 and fp16 files;
    the VAE's attention weights also stored 2-D, as some tools write them)."""
    state = ldm_state_dict(distinct_model)
    if half:
        state = {k: v.half() for k, v in state.items()}
    state = {
        k: (v.flatten(1) if ".mid.attn_1." in k and v.ndim == 4 else v).contiguous() for k, v in state.items()
    }
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    ours = load_single_file(path)
    for comp in SDXL.COMPONENTS:
        ref = _diffusers_reference(path, comp, tmp_path)
        assert_identical(getattr(ours, comp), ref)
        assert type(getattr(ours, comp)) is type(ref)
    fp16 = load_single_file(path, ["unet"], dtype=None)  # the file's own dtype, as stored
    assert {p.dtype for p in fp16.unet.parameters()} == {torch.float16 if half else torch.float32}


_PEAK_SCRIPT = """
import json, sys
from pathlib import Path
from bigasp.models.single_file import load_single_file
import accelerate, diffusers, transformers
# the model classes too: their lazy imports (about 60 MB of library code) are not the load's cost
from transformers import CLIPTextModel, CLIPTextModelWithProjection
from diffusers import UNet2DConditionModel
import bigasp.models.presets, tqdm

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
base = status("VmRSS")
m = load_single_file(sys.argv[1], ["text_encoder"])
params = sum(p.numel() * p.element_size() for p in m.text_encoder.parameters())
print(json.dumps({"added": status("VmHWM") - base, "params": params}))
"""


@pytest.mark.slow
def test_loading_an_fp16_file_costs_the_model_and_one_tensor(tmp_path):
    """Peak resident memory of loading SDXL's CLIP-L (the real size: 123 M parameters) from an
    fp16 file into fp32 modules: the modules plus about one tensor, where the old path also held
    the fp16 state dict and the memory-mapped file pages (about 2x the fp16 file more)."""
    import subprocess
    import sys

    from bigasp.models.presets import build_preset

    m = build_preset("sdxl-base", ["text_encoder"])
    path = save_single_file(m, tmp_path / "clip_l.safetensors", dtype=torch.float16)
    del m
    res = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    largest = 49408 * 768 * 2  # the token embedding, as read (fp16)
    assert got["added"] <= got["params"] + 2 * largest, got


_WIDEN_PEAK_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from bigasp.models.cast_at_use import cast_at_use
from bigasp.models.single_file import load_single_file
import accelerate, diffusers, transformers
# the model classes too: their lazy imports (about 60 MB of library code) are not the load's cost
from transformers import CLIPTextModel, CLIPTextModelWithProjection
from diffusers import UNet2DConditionModel
import bigasp.models.presets, tqdm

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
def peak_restart():
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
    return status("VmRSS")
ids = torch.arange(77).unsqueeze(0)
base = peak_restart()
m = load_single_file(sys.argv[1], ["text_encoder"], dtype=None)  # as stored: fp16
cast_at_use(m.text_encoder, torch.float32)
load = status("VmHWM") - base
loaded = peak_restart()
with torch.no_grad():
    out = m.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
forward = status("VmHWM") - loaded
# what the forward left alive: every fp32 tensor still reachable (the output is 0.2 MB)
import gc, warnings
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # isinstance on lazy library modules warns of deprecations
    live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
live_fp32 = sum(t.numel() * 4 for t in live if t.dtype == torch.float32)
# steady state: a second forward adds nothing resident (the first one's RSS includes allocator
# arenas of torch's threads and library pages touched on first use, which vary by machine)
again = peak_restart()
with torch.no_grad():
    m.text_encoder(ids, output_hidden_states=True)
stored = sum(p.numel() * p.element_size() for p in m.text_encoder.parameters())
print(json.dumps({"load": load, "forward": forward, "live_fp32": live_fp32,
                  "kept_by_another": status("VmRSS") - again, "stored": stored, "dtype": str(out.dtype)}))
"""


def test_an_fp32_forward_from_fp16_storage_costs_the_fp16_weights_and_one_widened_tensor(tmp_path):
    """Peak resident memory of loading SDXL's CLIP-L (the real size: 123 M parameters) from an
    fp16 file as stored and running it in fp32: the load costs the fp16 weights (0.25 GB, where
    fp32 weights take 0.49 GB), and the forward one layer's fp32 copy at a time (the token
    embedding is the largest), none of them kept afterwards: no fp32 tensor but the output stays
    alive, and a second forward leaves resident memory where it found it."""
    import subprocess
    import sys

    m = build_preset("sdxl-base", ["text_encoder"])
    path = save_single_file(m, tmp_path / "clip_l.safetensors", dtype=torch.float16)
    fp32_bytes = sum(p.numel() * 4 for p in m.text_encoder.parameters())
    del m
    res = subprocess.run(
        [sys.executable, "-c", _WIDEN_PEAK_SCRIPT, str(path)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["dtype"] == "torch.float32" and 2 * got["stored"] == fp32_bytes, got
    largest = 49408 * 768 * 4  # the token embedding, widened to fp32 for its lookup
    slack = 96 * 2**20  # library code touched on first use, activations, allocator
    assert got["load"] <= got["stored"] + slack < fp32_bytes, got
    assert got["forward"] <= largest + slack, got  # all widened at once: 0.49 GB more
    assert got["live_fp32"] <= 77 * 768 * 4 * 2, got  # the output and its input; a kept copy is 151 MB+
    assert got["kept_by_another"] <= slack, got
