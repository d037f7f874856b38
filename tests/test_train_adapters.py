"""Adapters (LoRA, LoCon, LoKr, LoHa) trained end to end on the tiny model.

They train through the same trainer path (both objectives, EMA, signals, bitwise resume, DDP),
their checkpoints hold the adapter only and refuse another base, and the files people use carry
the key names ComfyUI's LoRA loader and kohya's networks code use (facts recorded below) and
merge into the base to the model the trainer evaluated.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bigasp.errors import BigaspError, ConfigError
from bigasp.models import build_preset
from bigasp.models.adapter_files import kohya_module_map
from bigasp.models.single_file import component_to_ldm
from bigasp.sample.lora import LoraError, LoraSpec, apply_loras
from bigasp.store import LatentDataset
from bigasp.train import adapters
from bigasp.train import checkpoint as ck
from bigasp.train.synthetic import write_synthetic_latent_dataset
from bigasp.train.trainer import train
from train_helpers import ddp_worker, free_port, make_cfg

pytest.importorskip("peft")

# ---------------------------------------------------------------------------------------------
# Key-name facts, read from the sources (not copied code):
#
# ComfyUI, comfy/lora.py @ 41444b5236c613ee5ff7d09aa620f94b702f30eb
#   - model_lora_keys_unet: for every UNet weight `diffusion_model.<k>.weight` of the SGM state
#     dict, the kohya name is "lora_unet_" + <k> with "." -> "_"; diffusers LoRA keys are
#     "unet." + the diffusers module path.
#   - model_lora_keys_clip (SDXL: clip_l + clip_g present): "lora_te1_text_model_encoder_layers_{b}_{c}"
#     for CLIP-L, "lora_te2_..." for CLIP-G, c in LORA_CLIP_MAP values below; diffusers keys
#     "text_encoder.text_model.encoder.layers.{b}.{c}" and "text_encoder_2.…" with c dotted.
#   - load_lora: per layer "{x}.alpha", LoRA "{x}.lora_up.weight"/"{x}.lora_down.weight" (or
#     "{x}.lora_B.weight"/"{x}.lora_A.weight"), LoHa "{x}.hada_w1_a/_w1_b/_w2_a/_w2_b" (+ t1/t2),
#     LoKr "{x}.lokr_w1"|"{x}.lokr_w1_a/_b", "{x}.lokr_w2"|"{x}.lokr_w2_a/_b" (+ t2).
# ComfyUI, comfy/weight_adapter/loha.py @ 183b377588102d00131247aec399f8b34e1122b4:
#   delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / w1_b.shape[0], reshaped to the weight.
# ComfyUI, comfy/weight_adapter/lokr.py @ e8f3bc5ab766ba0149ac8ba8f67c328f8bb3da7d:
#   delta = kron(w1, w2) reshaped, times alpha / dim where dim = the rank of a decomposed factor
#   (w2_b.shape[0], else w1_b.shape[0]); 1.0 when neither factor is decomposed.
# kohya-ss/sd-scripts, networks/lora.py @ 02298e3c4a7e18b20eb1638169d30da013747053:
#   UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]; with conv dims also
#   ["ResnetBlock2D", "Downsample2D", "Upsample2D"]; TEXT_ENCODER_TARGET_REPLACE_MODULE =
#   ["CLIPAttention", "CLIPMLP"]; every Linear/Conv2d child of those is adapted; names
#   prefix + "." + module path with "." -> "_", prefixes lora_unet / lora_te1 / lora_te2;
#   scale = alpha / dim with dim = lora_down.size(0).
# ---------------------------------------------------------------------------------------------
COMFY_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}
COMFY_SUFFIXES = {
    "lora": {"alpha", "lora_up.weight", "lora_down.weight"},
    "loha": {"alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "lokr": {"alpha", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"},
}
KOHYA_UNET_CLASSES = {"Transformer2DModel"}
KOHYA_CONV_CLASSES = {"ResnetBlock2D", "Downsample2D", "Upsample2D"}
KOHYA_TE_CLASSES = {"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"}

# One setting per algorithm; the objectives alternate so both run through adapters.
RUNS = {
    "lora": {"objective": "eps", "targets": None},
    "locon": {"objective": "flow", "targets": None},
    "lokr": {"objective": "eps", "targets": "all"},
    "loha": {"objective": "flow", "targets": "attention"},
}


def adapter_cfg(run_dir: Path, data: Path, algo: str, **extra):
    run = RUNS[algo]
    model = {"adapter": algo, "adapter_rank": 4, "adapter_alpha": 2.0, "train_text_encoder": True}
    if run["targets"]:
        model["adapter_targets"] = run["targets"]
    model |= extra.pop("model", {})
    train_sec = {"objective": run["objective"], **extra.pop("train", {})}
    return make_cfg(run_dir, data, model=model, train=train_sec, **extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_latent_dataset(tmp_path_factory.mktemp("data") / "ds", n=12, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """One short run per algorithm (8 samples, TE1 adapted, EMA on): algo -> (cfg, checkpoint)."""
    out = {}
    for algo in RUNS:
        cfg = adapter_cfg(
            tmp_path_factory.mktemp(algo) / "run", data, algo,
            train={"max_samples": 8}, ema={"enabled": True, "decay": 0.5},
            validation={"every": 8, "at_start": False, "stable": False},
        )  # fmt: skip
        out[algo] = (cfg, train(cfg).last_checkpoint)
    return out


def live_model(cfg, ckpt: Path | None):
    """The model as the trainer evaluates it: the base with the adapter (weights from `ckpt`)."""
    model = build_preset("tiny", ("unet", "text_encoder", "text_encoder_2"), seed=0)
    adapters.apply_adapters(cfg, model)
    if ckpt is not None:
        adapters.load_state(model, ckpt / "model")
    for m in (model.unet, model.text_encoder, model.text_encoder_2):
        m.eval()
    return model


def denoise(model) -> torch.Tensor:
    """The trainer's forward (Denoiser: TE1 + TE2 -> UNet) on fixed inputs."""
    from bigasp.train.denoiser import Denoiser

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ids1 = torch.randint(0, 1000, (2, 1, 77), generator=g)
    ids2 = torch.randint(0, 1000, (2, 1, 77), generator=g)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    with torch.no_grad():
        return Denoiser(model.unet, model.text_encoder, model.text_encoder_2)(
            x, torch.tensor([300, 700]), ids1, ids2, time_ids
        )


# ---------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize(
    ("model", "train_sec", "pattern"),
    [
        ({"adapter": "dora"}, {}, r"model\.adapter"),
        ({"adapter": "lora", "adapter_rank": 0}, {}, r"model\.adapter_rank"),
        ({"adapter": "lora", "adapter_targets": "mlp"}, {}, r"model\.adapter_targets"),
        ({"adapter": "locon", "adapter_targets": "attention"}, {}, r"model\.adapter_targets = 'attention'"),
        ({"adapter": "lora", "adapter_targets": "all"}, {}, r"model\.adapter = 'locon'"),
        ({"adapter_rank": 8}, {}, r"model\.adapter_rank is set but model\.adapter is unset"),
        ({"adapter": "lora", "text_encoder_layers": 1}, {}, r"model\.text_encoder_layers cannot combine"),
        ({"adapter": "lora", "frozen_dtype": "bf16"}, {}, r"train\.precision = 'bf16'"),
        ({"adapter": "lora"}, {"parallelism": "fsdp2", "precision": "bf16"}, r"train\.parallelism = 'fsdp2'"),
    ],
)
def test_bad_adapter_settings_are_one_line_errors(tmp_path, model, train_sec, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        make_cfg(tmp_path, tmp_path, model=model, train=train_sec)
    assert "\n" not in str(err.value).strip()


def test_cli_refuses_a_bad_rank_before_loading_anything(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\nsource = "does-not-exist"\nadapter = "lora"\nadapter_rank = 0\n')
    exe = Path(sys.executable).with_name("bigasp")
    out = subprocess.run([str(exe), "train", str(cfg)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "model.adapter_rank" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists()


def test_presets_are_kohyas_module_sets(tiny_model):
    """attention_ff = every Linear/Conv2d inside a Transformer2DModel, all = plus ResnetBlock2D /
    Downsample2D / Upsample2D (kohya's LoRA and LoCon sets); encoders: CLIPAttention + CLIPMLP."""

    def kohya_set(root, classes):
        found = set()
        for name, mod in root.named_modules():
            if type(mod).__name__ in classes:
                for child, sub in mod.named_modules():
                    if child and isinstance(sub, torch.nn.Linear | torch.nn.Conv2d):
                        found.add(f"{name}.{child}")
        return found

    unet, te2 = tiny_model.unet, tiny_model.text_encoder_2
    lora_set = set(adapters.target_modules("unet", unet, "attention_ff"))
    assert lora_set == kohya_set(unet, KOHYA_UNET_CLASSES)
    assert set(adapters.target_modules("unet", unet, "all")) == kohya_set(
        unet, KOHYA_UNET_CLASSES | KOHYA_CONV_CLASSES
    )
    attention = set(adapters.target_modules("unet", unet, "attention"))
    assert attention and attention < lora_set and all(re.search(r"\.attn[12]\.to_", n) for n in attention)
    assert set(adapters.target_modules("text_encoder_2", te2, "attention_ff")) == kohya_set(
        te2, KOHYA_TE_CLASSES
    )
    te1 = adapters.target_modules("text_encoder", tiny_model.text_encoder, "attention_ff")
    n_layers = len(getattr(tiny_model.text_encoder, "text_model", tiny_model.text_encoder).encoder.layers)
    assert not any(f"layers.{n_layers - 1}." in n for n in te1)  # TE1's unused last layer: no adapter


def test_apply_adapters_returns_only_the_adapter_parameters():
    """The function the memory bench calls: the base frozen, the adapter's parameters returned."""
    cfg = make_cfg(
        Path("run"), Path("ds"), model={"adapter": "lora", "adapter_rank": 3, "train_text_encoder": False}
    )
    model = build_preset("tiny", ("unet", "text_encoder", "text_encoder_2"), seed=0)
    targets = adapters.target_modules("unet", model.unet, "attention_ff")
    expected = sum(
        3 * (m.in_features + m.out_features) for n, m in model.unet.named_modules() if n in targets
    )
    params = adapters.apply_adapters(cfg, model)
    assert sum(p.numel() for p in params) == expected
    assert {id(p) for p in params} == {id(p) for p in model.unet.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def test_gradient_checkpointing_gives_the_adapter_the_same_gradients():
    cfg = make_cfg(Path("run"), Path("ds"), model={"adapter": "locon", "adapter_rank": 2})
    grads = []
    for checkpointing in (False, True):
        model = live_model(cfg, None)
        model.unet.train()
        with torch.no_grad():  # a non-zero adapter, so every factor gets a gradient
            for n, p in model.unet.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
        from bigasp.train.denoiser import Denoiser

        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=g)
        ids = torch.randint(0, 1000, (1, 1, 77), generator=g)
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
        Denoiser(model.unet, model.text_encoder, model.text_encoder_2)(
            x, torch.tensor([500]), ids, ids, time_ids
        ).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.unet.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)
        assert grads[0][n].abs().sum() > 0, n


# ---------------------------------------------------------------------------------------------
# training, files, merge


@pytest.mark.slow
@pytest.mark.parametrize("algo", list(RUNS))
def test_trained_adapter_merges_into_the_model_the_trainer_evaluated(trained, algo):
    """generate --lora's merge of the kohya file (and of the diffusers file for LoRA/LoCon) equals
    the base + adapter the trainer ran, within fp32 rounding; the EMA's file likewise."""
    cfg, ckpt = trained[algo]
    meta = adapters.read_meta(ckpt / "model")
    assert meta["algorithm"] == algo and meta["base"]["identity"].startswith("base-")
    assert not (ckpt / "model" / "unet" / "diffusion_pytorch_model.safetensors").exists()  # no base copy
    evaluated = denoise(live_model(cfg, ckpt))
    base_out = denoise(live_model(cfg, None))  # zero-initialised adapter = the base
    assert (evaluated - base_out).abs().max() > 1e-5  # training moved the adapter
    files = ["lora.safetensors"] + (["pytorch_lora_weights.safetensors"] if algo in ("lora", "locon") else [])
    assert meta["files"] == files
    for name in files:
        merged = build_preset("tiny", ("unet", "text_encoder", "text_encoder_2"), seed=0)
        apply_loras(merged, [LoraSpec(ckpt / "model" / name, 1.0)])
        torch.testing.assert_close(denoise(merged), evaluated, rtol=1e-4, atol=2e-5)
    # the EMA's adapter merges to the EMA-averaged model
    ema_model = live_model(cfg, None)
    adapters.load_state(ema_model, ckpt / "ema")
    merged = build_preset("tiny", ("unet", "text_encoder", "text_encoder_2"), seed=0)
    apply_loras(merged, [LoraSpec(ckpt / "ema" / "lora.safetensors", 1.0)])
    torch.testing.assert_close(denoise(merged), denoise(ema_model), rtol=1e-4, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("algo", list(RUNS))
def test_file_key_names_are_those_comfyui_and_kohya_read(trained, tiny_model, algo):
    _, ckpt = trained[algo]
    sgm = component_to_ldm("unet", tiny_model.unet)
    comfy_unet = {
        "lora_unet_" + k.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
        for k in sgm
        if k.endswith(".weight")
    }
    te_layers = range(32)
    comfy_te = {
        f"lora_te{i}_text_model_encoder_layers_{b}_{c}"
        for i in (1, 2)
        for b in te_layers
        for c in COMFY_CLIP_MAP.values()
    }
    family = "lora" if algo in ("lora", "locon") else algo
    with safe_open(str(ckpt / "model" / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    layers: dict[str, set[str]] = {}
    for k in keys:
        layer, suffix = k.split(".", 1)
        layers.setdefault(layer, set()).add(suffix)
    assert {name.split("_")[1] for name in layers} == {"unet", "te1"}  # TE1 adapted, TE2 not
    assert all(name in comfy_unet | comfy_te for name in layers), sorted(set(layers) - comfy_unet - comfy_te)[
        :3
    ]
    assert all(s <= COMFY_SUFFIXES[family] and "alpha" in s for s in layers.values())
    if algo == "locon":  # convs too: resnet conv1 under its SGM name (input_blocks_1_0_in_layers_2)
        assert any(re.fullmatch(r"lora_unet_input_blocks_\d+_0_in_layers_2", n) for n in layers)
    if algo == "loha":  # attention preset: only q/k/v/out
        assert all(re.search(r"(to_[qkv]|to_out_0|self_attn_\w+_proj)$", n) for n in layers)
    assert meta["ss_network_module"] == ("networks.lora" if family == "lora" else "lycoris.kohya")
    if family == "lora":
        comfy_diffusers = {f"unet.{n}" for n, _ in tiny_model.unet.named_modules()} | {
            f"text_encoder.text_model.encoder.layers.{b}.{c}" for b in te_layers for c in COMFY_CLIP_MAP
        }
        d = load_file(str(ckpt / "model" / "pytorch_lora_weights.safetensors"))
        mods = {k.rsplit(".", 2)[0] for k in d}
        assert mods <= comfy_diffusers, sorted(mods - comfy_diffusers)[:3]
        assert {k.rsplit(".", 2)[1] for k in d} == {"lora_A", "lora_B"}
        k = load_file(str(ckpt / "model" / "lora.safetensors"))
        down = next(n for n in k if n.endswith("lora_down.weight"))
        assert k[down].shape[0] == 4 and float(k[down.replace("lora_down.weight", "alpha")]) == 2.0


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_layers_merge_as_the_lycoris_package_computes_them(trained, tiny_model, algo):
    """The weight delta bigasp merges for each LoKr/LoHa layer of a trained file equals the one
    the LyCORIS package (lycoris-lora, the reference implementation of both algorithms) computes
    from the same tensors: `lycoris.functional.{lokr,loha}.diff_weight`."""
    functional = pytest.importorskip("lycoris.functional")
    from bigasp.models.adapter_files import lycoris_delta

    tensors = load_file(str(trained[algo][1] / "model" / "lora.safetensors"))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix.removesuffix(".weight")] = t.float()
    layers = kohya_module_map(tiny_model)
    assert len(groups) > 4
    for name, p in groups.items():
        shape = layers[name][1].weight.shape
        alpha = float(p["alpha"])
        if algo == "loha":  # LyCORIS: (w1d, w1u, w2d, w2u, t1, t2), gamma = alpha / rank
            ref = functional.loha.diff_weight(p["hada_w1_b"], p["hada_w1_a"], p["hada_w2_b"], p["hada_w2_a"],
                                              None, None, gamma=alpha / p["hada_w1_b"].shape[0], backend="torch")  # fmt: skip
        else:  # LyCORIS: (w1, w1a, w1b, w2, w2a, w2b, t), gamma = alpha (divided by the factored rank)
            ref = functional.lokr.diff_weight(*(p.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                                                                    "lokr_w2_a", "lokr_w2_b", "lokr_t2")),
                                              gamma=alpha, backend="torch")  # fmt: skip
        ours = lycoris_delta(p, shape)
        torch.testing.assert_close(ours, ref.reshape(shape).float(), rtol=1e-5, atol=1e-7, msg=name)


def _one_line_lora_error(model, path: Path) -> str:
    with pytest.raises(LoraError) as err:
        apply_loras(model, [LoraSpec(path, 1.0)])
    text = str(err.value)
    assert "\n" not in text.strip()
    return text


def test_a_lora_for_another_architecture_is_refused_in_one_line(tmp_path):
    model = build_preset("tiny", ("unet", "text_encoder", "text_encoder_2"), seed=0)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    # SD 1.5's kohya names (diffusers block names, 320-wide attention) and a Flux LoKr
    sd15 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {f"{sd15}.lora_down.weight": torch.zeros(4, 320), f"{sd15}.lora_up.weight": torch.zeros(320, 4),
         f"{sd15}.alpha": torch.tensor(4.0)}, str(tmp_path / "sd15.safetensors"),
    )  # fmt: skip
    flux = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file(
        {f"{flux}.lokr_w1": torch.zeros(4, 4), f"{flux}.lokr_w2": torch.zeros(768, 768),
         f"{flux}.alpha": torch.tensor(4.0)}, str(tmp_path / "flux.safetensors"),
    )  # fmt: skip
    text = _one_line_lora_error(model, tmp_path / "sd15.safetensors")
    assert (
        "sd15.safetensors" in text and "another architecture" in text and "down_blocks.0.attentions" in text
    )
    text = _one_line_lora_error(model, tmp_path / "flux.safetensors")
    assert "another architecture" in text and flux in text
    # a right name with the wrong shape (another rank layout / width)
    name = next(n for n in kohya_module_map(model) if n.endswith("attn1_to_q"))
    save_file(
        {f"{name}.hada_w1_a": torch.zeros(7, 2), f"{name}.hada_w1_b": torch.zeros(2, 7),
         f"{name}.hada_w2_a": torch.zeros(7, 2), f"{name}.hada_w2_b": torch.zeros(2, 7)},
        str(tmp_path / "shape.safetensors"),
    )  # fmt: skip
    assert "does not fit this model" in _one_line_lora_error(model, tmp_path / "shape.safetensors")
    after = model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before any weight changed


# ---------------------------------------------------------------------------------------------
# resume, signals, base identity, DDP


class Preempt:
    """A LatentDataset that sends this process SIGTERM on a given latent read."""

    def __init__(self, ds: LatentDataset, at_read: int):
        self.ds, self.table, self.reads, self.at = ds, ds.table, 0, at_read

    def __len__(self) -> int:
        return len(self.ds)

    def read_latent(self, i: int) -> torch.Tensor:
        self.reads += 1
        if self.reads == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.ds.read_latent(i)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_sigterm_checkpoint_and_resume_are_bitwise(tmp_path, data, algo):
    extra = dict(
        model={"adapter_dropout": 0.1}, ema={"enabled": True, "decay": 0.9}, train={"max_samples": 16}
    )
    ref = adapter_cfg(tmp_path / "a", data, algo, **extra)
    full = train(ref)
    cut = adapter_cfg(tmp_path / "b", data, algo, **extra)
    first = train(cut, dataset=Preempt(LatentDataset(str(data)), at_read=6))
    assert first.stopped_by_signal and first.samples_seen == 8
    second = train(cut, resume="auto")
    assert second.samples_seen == 16
    for sub in ("model/unet/adapter.safetensors", "model/text_encoder/adapter.safetensors",
                "ema/unet/adapter.safetensors", "state/optimizer.safetensors"):  # fmt: skip
        a, b = load_file(str(full.last_checkpoint / sub)), load_file(str(second.last_checkpoint / sub))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    a = load_file(str(full.last_checkpoint / "model" / "lora.safetensors"))
    b = load_file(str(second.last_checkpoint / "model" / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_on_another_base_or_settings_is_refused_and_nothing_is_replaced(tmp_path, data):
    cfg = adapter_cfg(tmp_path / "run", data, "lora", train={"max_samples": 16})
    first = train(cfg, stop_at=8)
    run_config = (tmp_path / "run" / "config.toml").read_bytes()
    files = {p: p.read_bytes() for p in sorted(first.last_checkpoint.rglob("*")) if p.is_file()}

    def refused(pattern: str, **model) -> None:
        other = adapter_cfg(tmp_path / "run", data, "lora", train={"max_samples": 16}, model=model)
        with pytest.raises(BigaspError, match=pattern) as err:
            train(other, resume="auto")
        assert "\n" not in str(err.value)

    refused(r"^model\.source = tiny is not the base .* was trained on", init_seed=1)  # another base
    refused(r"^model\.adapter_rank gives 8 but .* trained 4", adapter_rank=8)
    refused(r"^model\.adapter gives 'loha' but .* trained 'lora'", adapter="loha")
    full = make_cfg(tmp_path / "run", data, train={"max_samples": 16})
    with pytest.raises(BigaspError, match=r"holds a lora adapter, not a model: set model\.adapter = 'lora'"):
        train(full, resume="auto")
    assert (tmp_path / "run" / "config.toml").read_bytes() == run_config
    assert [p.name for p in ck.list_complete_checkpoints(tmp_path / "run")] == [first.last_checkpoint.name]
    assert all(p.read_bytes() == b for p, b in files.items())
    assert train(cfg, resume="auto").samples_seen == 16  # the right base resumes


@pytest.mark.slow
def test_ddp_two_gloo_processes_train_the_adapter_as_one_process(tmp_path, data):
    common = dict(train={"max_samples": 8}, logging={"every": 4, "batch_log": True, "flops": False})
    single = adapter_cfg(tmp_path / "one", data, "locon", **common)
    one = train(single).last_checkpoint
    multi = adapter_cfg(tmp_path / "two", data, "locon", **common)
    mp.start_processes(
        ddp_worker, args=(2, free_port(), multi.model_dump_json()), nprocs=2, start_method="fork", join=True
    )
    two = ck.list_complete_checkpoints(multi.run_dir)[-1]
    assert ck.read_meta(two)["world_size"] == 2 and one.name == two.name
    a = load_file(str(one / "model" / "unet" / "adapter.safetensors"))
    b = load_file(str(two / "model" / "unet" / "adapter.safetensors"))
    init = live_model(single, None)
    start = {n: p for n, p in init.unet.named_parameters() if p.requires_grad}
    moved = max(float((a[k] - start[k].detach()).abs().max()) for k in a)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4 and moved > 10 * worst, (worst, moved)  # summation order only


@pytest.mark.slow
def test_watch_samples_an_adapter_run_on_its_base_as_generate_lora_does(data, tmp_path):
    """`bigasp watch RUN` of an adapter run loads the recorded base with each checkpoint's
    lora.safetensors: the same image as `generate --model BASE --lora FILE`."""
    import numpy as np
    from PIL import Image

    from bigasp.cli import main
    from bigasp.models.io import save_diffusers_folder

    fast = ["--size", "64x64", "--steps", "2", "--device", "cpu", "--no-progress"]
    base = tmp_path / "base"
    save_diffusers_folder(build_preset("tiny", seed=0), base)
    cfg = adapter_cfg(tmp_path / "run", data, "lora", model={"source": str(base)}, train={"max_samples": 8})
    ckpt = train(cfg).last_checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    main(["watch", cfg.run_dir, "--prompts", str(prompts), "--seeds", "3", "--once", *fast])
    main(["generate", "a red circle", "--model", str(base), "--lora", str(ckpt / "model" / "lora.safetensors"),
          "--seed", "3", "--out", str(tmp_path / "gen"), *fast])  # fmt: skip
    (png,) = (tmp_path / "gen").glob("*.png")
    with Image.open(Path(cfg.run_dir) / "samples" / ckpt.name / "p000-seed3.png") as a, Image.open(png) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_exporting_an_adapter_checkpoint_says_to_use_it_on_its_base(trained, tmp_path):
    """`model export` / `generate --model` on an adapter checkpoint (the step folder or its model/):
    one line naming the algorithm and the file to pass as `--lora`, nothing written."""
    from bigasp.errors import ModelLoadError
    from bigasp.models.io import load_model

    ckpt = trained["lokr"][1]
    for spec in (ckpt, ckpt / "model"):
        with pytest.raises(ModelLoadError) as err:
            load_model(spec)
        msg = str(err.value)
        assert "lokr checkpoint" in msg and f"--lora {ckpt / 'model' / 'lora.safetensors'}" in msg, msg
        assert "\n" not in msg
    exe = Path(sys.executable).with_name("bigasp")
    out = subprocess.run([str(exe), "model", "export", str(ckpt), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode != 0 and "lokr checkpoint" in out.stderr and "Traceback" not in out.stderr, (
        out.stderr
    )
    assert not (tmp_path / "out").exists()
