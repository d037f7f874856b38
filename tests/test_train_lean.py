"""The memory-lean full finetune: stochastic rounding against fp32 arithmetic, the optimizer step
fused into backward against the unfused step, bitwise resume per lean option, `bigasp generate` on
a lean checkpoint, and each combination that cannot work refused in one line before a model loads.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigasp.config import validate
from bigasp.errors import ConfigError
from bigasp.models import build_preset
from bigasp.train import checkpoint as ck
from bigasp.train.config import RunConfig
from bigasp.train.denoiser import Denoiser
from bigasp.train.lean import FusedStep, FusedStepError, WholeStep, build_update, stochastic_round_bf16
from bigasp.train.synthetic import write_synthetic_latent_dataset
from bigasp.train.trainer import configure_model, train
from train_helpers import make_cfg, weights

LEAN = {"trained_dtype": "bf16"}
BF16 = {"precision": "bf16"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_latent_dataset(tmp_path_factory.mktemp("data") / "ds", n=12, seed=0)


# ---- stochastic rounding ----------------------------------------------------------------------


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above each x, from torch's round-to-nearest and nextafter."""
    near = x.to(torch.bfloat16)
    up = torch.nextafter(near, torch.full_like(near, float("inf")))
    down = torch.nextafter(near, torch.full_like(near, float("-inf")))
    below = torch.where(near.float() <= x, near, down)
    above = torch.where(near.float() <= x, up, near)
    return below, above


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g, dtype=torch.float32) * torch.logspace(-3, 3, 64)
    below, above = bf16_neighbours(x)
    assert bool((below.float() < x).all() and (x < above.float()).all())  # none exactly representable
    draws = 4000
    out = torch.stack([stochastic_round_bf16(x, torch.Generator().manual_seed(s)) for s in range(draws)])
    assert bool(((out == below) | (out == above)).all())
    # E[round(x)] = x: P(above) = (x - below) / (above - below); 5 standard errors of a Bernoulli mean
    p = ((x.double() - below.double()) / (above.double() - below.double())).clamp(1e-9, 1 - 1e-9)
    frac_up = (out == above).double().mean(0)
    assert bool(((frac_up - p).abs() <= 5 * (p * (1 - p) / draws).sqrt() + 1e-3).all()), (
        (frac_up - p).abs().max()
    )


def test_small_updates_are_lost_by_nearest_rounding_and_kept_by_stochastic_rounding():
    """1.0 plus 2^-10 per step (a quarter of bf16's spacing at 1): fp32 arithmetic reaches 1.25 after
    256 steps; bf16 round-to-nearest never moves; stochastic rounding follows fp32 on average."""
    steps, u = 256, 2.0**-10
    nearest = torch.ones(1000, dtype=torch.bfloat16)
    rounded = torch.ones(1000, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        nearest = (nearest.float() + u).to(torch.bfloat16)
        rounded = stochastic_round_bf16(rounded.float() + u, gen)
    reference = 1.0 + steps * u
    assert bool((nearest == 1.0).all())
    assert abs(rounded.double().mean().item() - reference) < 0.005, rounded.double().mean().item()


# ---- fused backward == unfused step -----------------------------------------------------------


def two_steps(cfg: RunConfig, device: str = "cpu") -> tuple[dict[str, torch.Tensor], int]:
    """Two optimizer steps of the tiny model through the trainer's own setup and update path.
    Returns the UNet weights and the most gradients alive at once while stepping."""
    torch.manual_seed(0)
    model = build_preset("tiny", ("unet", "text_encoder", "text_encoder_2"), seed=0)
    configure_model(model, cfg, torch.device(device))
    params = [
        p
        for m in (model.unet, model.text_encoder, model.text_encoder_2)
        for p in m.parameters()
        if p.requires_grad
    ]
    most = [0]

    def count(_p):
        most[0] = max(most[0], sum(q.grad is not None for q in params))

    handles = [p.register_post_accumulate_grad_hook(count) for p in params]  # before the fused hooks
    step = [0]
    update = build_update(cfg, model, torch.device(device), step_index=lambda: step[0])
    net = Denoiser(model.unet, model.text_encoder, model.text_encoder_2)
    g = torch.Generator().manual_seed(0)
    for step[0] in range(2):
        x = torch.randn(2, 4, 8, 8, generator=g)
        ids = torch.randint(0, 400, (2, 1, 77), generator=g)
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
        x, ids, time_ids = x.to(device), ids.to(device), time_ids.to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            pred = net(x, torch.tensor([100, 700], device=device), ids, ids, time_ids)
        update.backward(pred.float().sub(x).square().mean())
        update.grad_norm()
        update.step()
        update.finish()
    for h in handles:
        h.remove()
    return {k: v.detach().cpu().clone() for k, v in model.unet.state_dict().items()}, most[0]


@pytest.mark.parametrize(
    "model,train_",
    [
        ({}, {"precision": "fp32", "optimizer": "adamw"}),
        (LEAN, {**BF16, "optimizer": "adamw"}),
        (LEAN, {**BF16, "optimizer": "adafactor"}),
        (LEAN, {**BF16, "optimizer": "adamw8bit"}),
        ({**LEAN, "gradient_checkpointing": True}, {**BF16, "optimizer": "adafactor"}),
    ],
    ids=["fp32-adamw", "bf16-adamw", "bf16-adafactor", "bf16-adamw8bit", "bf16-adafactor-checkpointing"],
)
def test_fused_backward_equals_the_unfused_step_bitwise(tmp_path, data, model, train_):
    common = {**train_, "batch_size": 2, "grad_clip": None}
    unfused_cfg = make_cfg(tmp_path / "a", data, model=model, train=common)
    fused_cfg = make_cfg(tmp_path / "b", data, model=model, train={**common, "fused_backward": True})
    unfused, unfused_live = two_steps(unfused_cfg)
    fused, fused_live = two_steps(fused_cfg)
    initial = build_preset("tiny", ("unet",), seed=0).unet.state_dict()
    assert any(not torch.equal(unfused[k].float(), initial[k]) for k in unfused)  # it trained
    assert all(torch.equal(unfused[k], fused[k]) for k in unfused), [
        k for k in unfused if not torch.equal(unfused[k], fused[k])
    ][:5]
    n_params = sum(1 for _ in build_preset("tiny", ("unet",), seed=0).unet.parameters())
    assert fused_live == 1 and unfused_live > n_params  # fused: one gradient alive at a time


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["adafactor", "adamw8bit", "paged_adamw8bit"])
def test_fused_backward_on_cuda_equals_the_unfused_step(tmp_path, data, optimizer):
    if "8bit" in optimizer:  # the device image may lack it (too big to carry); the CPU tests cover the logic
        pytest.importorskip("bitsandbytes")
    common = {**BF16, "optimizer": optimizer, "batch_size": 2, "grad_clip": None, "device": "cuda"}
    unfused, _ = two_steps(make_cfg(tmp_path / "a", data, model=LEAN, train=common), "cuda")
    fused, live = two_steps(
        make_cfg(tmp_path / "b", data, model=LEAN, train={**common, "fused_backward": True}), "cuda"
    )
    assert live == 1
    assert all(torch.equal(unfused[k], fused[k]) for k in unfused)


def test_lean_path_choice_and_defaults(tmp_path, data):
    fused = make_cfg(
        tmp_path,
        data,
        model={**LEAN, "train_text_encoder": False},
        train={**BF16, "batch_size": 2, "fused_backward": True},
    )
    assert fused.train.grad_clip is None  # fused backward defaults to no clipping
    raw = {"model": {"trained_dtype": "bf16"}, "train": {"precision": "bf16"}}
    assert validate(RunConfig, raw).model.train_text_encoder is False  # lean: no TE training unless asked
    raw["model"]["train_text_encoder"] = True
    assert validate(RunConfig, raw).model.train_text_encoder is True
    default = RunConfig()
    assert (default.train.optimizer, default.model.trained_dtype, default.train.fused_backward) == (
        "adamw", "fp32", False)  # fmt: skip
    assert default.model.train_text_encoder and default.train.grad_clip == 1.0
    model = build_preset("tiny", ("unet", "text_encoder", "text_encoder_2"), seed=0)
    configure_model(model, make_cfg(tmp_path, data), torch.device("cpu"))
    assert type(build_update(make_cfg(tmp_path, data), model, torch.device("cpu"))) is WholeStep


# ---- bitwise resume per lean option -----------------------------------------------------------


LEAN_RUNS = {
    "bf16-adamw": (LEAN, {**BF16, "optimizer": "adamw"}),
    "bf16-adamw8bit": (LEAN, {**BF16, "optimizer": "adamw8bit"}),
    "bf16-adafactor-fused-checkpointing": (
        {**LEAN, "gradient_checkpointing": True},
        {**BF16, "optimizer": "adafactor", "fused_backward": True, "batch_size": 2},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("option", list(LEAN_RUNS))
def test_lean_run_resumed_equals_uninterrupted(tmp_path, data, option):
    model, train_ = LEAN_RUNS[option]
    full = train(make_cfg(tmp_path / "a", data, model=model, train=train_))
    cut_cfg = make_cfg(tmp_path / "b", data, model=model, train=train_)
    first = train(cut_cfg, stop_at=8)
    assert first.samples_seen == 8
    second = train(cut_cfg, resume="auto")
    assert second.samples_seen == full.samples_seen == 16
    a, b = weights(full.last_checkpoint), weights(second.last_checkpoint)
    assert a["unet.conv_in.weight"].dtype == torch.bfloat16
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert not torch.equal(a["unet.conv_in.weight"], weights(first.last_checkpoint)["unet.conv_in.weight"])
    opt_a = load_file(str(full.last_checkpoint / "state" / "optimizer.safetensors"))
    opt_b = load_file(str(second.last_checkpoint / "state" / "optimizer.safetensors"))
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    state = ck.load_state(second.last_checkpoint)["optimizer"]["state"]["unet.conv_in.weight"]
    tensors = dict(ck._nested_items(state))
    assert all(v.dtype != torch.bfloat16 for v in tensors.values() if isinstance(v, torch.Tensor))


# ---- the checkpoint in the dtype asked for, and generate -------------------------------------


@pytest.mark.slow
def test_lean_checkpoint_saved_in_fp32_loads_in_generate(tmp_path, data):
    cfg = make_cfg(
        tmp_path / "run", data, model={**LEAN, "save_dtype": "fp32", "save_vae": True},
        train={**BF16, "optimizer": "adafactor", "fused_backward": True, "batch_size": 2, "max_samples": 4},
    )  # fmt: skip
    result = train(cfg)
    saved = load_file(str(result.last_checkpoint / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert all(torch.equal(v, v.to(torch.bfloat16).float()) for v in saved.values())  # bf16 values, exactly
    out = tmp_path / "images"
    exe = Path(sys.executable).with_name("bigasp")
    proc = subprocess.run(
        [str(exe), "generate", "a cat", "--model", str(result.last_checkpoint / "model"), "--size", "64x64",
         "--steps", "2", "--seed", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.name for p in out.glob("*.png")] == ["1-00-00.png"]


# ---- bad combinations: one line, before any model loads ---------------------------------------


@pytest.mark.parametrize(
    "model,train_,needle",
    [
        (LEAN, {"precision": "fp16"}, "model.trained_dtype = 'bf16' needs train.precision = 'bf16'"),
        ({"save_dtype": "bf16"}, {}, "model.save_dtype = 'bf16' would round fp32 master weights"),
        (
            {},
            {"fused_backward": True, "precision": "fp16"},
            "train.fused_backward cannot run with train.precision",
        ),
        ({}, {"fused_backward": True, "gradient_accumulation": 2}, "train.gradient_accumulation = 2 cannot"),
        ({}, {"fused_backward": True, "grad_clip": 1.0}, "train.grad_clip cannot be combined"),
    ],
)
def test_impossible_lean_configs_are_refused_in_one_line(tmp_path, data, model, train_, needle):
    with pytest.raises(ConfigError) as err:
        make_cfg(tmp_path, data, model=model, train=train_)
    assert needle in str(err.value) and "\n" not in str(err.value).strip()


@pytest.mark.parametrize(
    "train_,needle",
    [
        ({"optimizer": "paged_adamw8bit"}, "train.optimizer = 'paged_adamw8bit' needs a CUDA device"),
        ({"fused_backward": True}, "means 2 accumulation micro-steps; set train.batch_size"),
    ],
)
def test_machine_dependent_refusals_come_before_the_model_loads(tmp_path, data, train_, needle):
    cfg = make_cfg(tmp_path / "run", data, model={"source": str(tmp_path / "no-such-model")}, train=train_)
    with pytest.raises(ConfigError) as err:
        train(cfg)  # a model load would fail on the missing source instead
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_refuses_cuda_only_optimizer_on_cpu_in_one_line(tmp_path, data):
    cfg = tmp_path / "lean.toml"
    cfg.write_text(
        f'run_dir = "{tmp_path / "run"}"\n[model]\nsource = "tiny"\n[data]\ndataset = "{data}"\n'
        'device_batch_size = 2\n[train]\nbatch_size = 2\ndevice = "cpu"\noptimizer = "paged_adamw8bit"\n'
    )
    exe = Path(sys.executable).with_name("bigasp")
    proc = subprocess.run([str(exe), "train", str(cfg)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip() and " INFO " not in x]  # not the thread report
    assert (
        "Traceback" not in proc.stderr
        and len(lines) == 1
        and "train.optimizer = 'paged_adamw8bit' needs a CUDA device" in lines[0]
    ), lines


def test_fused_step_skips_a_non_finite_loss_and_refuses_to_hide_a_non_finite_gradient():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.1}])
    update = FusedStep(
        opt, torch.amp.GradScaler("cpu", enabled=False), [p], None, seed=0, step_index=lambda: 0
    )
    update.backward(p.sum())  # stepped inside backward
    assert torch.equal(p.detach(), torch.full((3,), 0.9)) and p.grad is None
    assert float(update.grad_norm()) == pytest.approx(3**0.5)
    update.backward((p * float("nan")).sum())  # non-finite loss: backward skipped, nothing stepped
    assert not torch.isfinite(update.grad_norm())
    update.skip()
    assert torch.equal(p.detach(), torch.full((3,), 0.9))
    handle = p.register_hook(lambda g: g * float("inf"))  # a finite loss with a non-finite gradient
    update.backward(p.sum())
    handle.remove()
    with pytest.raises(FusedStepError, match="cannot be undone"):
        update.skip()


def test_8bit_optimizer_without_bitsandbytes_is_refused_before_the_model_loads(tmp_path, data, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    cfg = make_cfg(tmp_path / "run", data, model={"source": str(tmp_path / "no-such-model")},
                   train={"optimizer": "adamw8bit"})  # fmt: skip
    with pytest.raises(ConfigError, match=r"train.optimizer = 'adamw8bit' needs the bitsandbytes package"):
        train(cfg)
