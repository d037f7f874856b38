"""`bigasp bench train`: one real optimizer step of UNet (+ TE1) on synthetic data.

Random weights from the shipped configs (no download), synthetic latents and token ids of
the asked-for prompt length, fp32 master weights with bf16/fp16 autocast (or FSDP2's bf16
params), SDPA attention, channels-last, fused AdamW on CUDA. FLOPs are counted from one
eager forward+backward (flops.py), so MFU is measured against the work the step really did
— a checkpointed step reports its recompute as extra time, not extra model FLOPs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from bigasp.bench import H100_BF16_PEAK_TFLOPS
from bigasp.bench.common import (
    BenchResult,
    PeakMemory,
    machine_info,
    precision_dtype,
    summarize,
    time_iterations,
)
from bigasp.errors import ConfigError
from bigasp.flops import count_flops


@dataclass
class TrainBenchConfig:
    preset: str = "tiny"
    height: int = 64
    width: int = 64
    device_batch: int = 4
    precision: str = "bf16"
    tokens: int = 231
    compile: bool = False
    compile_scope: str = "blocks"  # "blocks": each resnet/transformer block; "whole": the UNet
    checkpointing: bool = False
    fsdp: bool = False
    train_te1: bool = True
    channels_last: bool = True
    warmup: int = 2
    iters: int = 5
    seed: int = 0
    prediction: str = "eps"  # "eps" (bigASP v2) or "flow" (v2.5): same FLOPs, different target
    lr: float = 1e-5
    peak_tflops: float = H100_BF16_PEAK_TFLOPS
    device: str = "cpu"

    def validate(self) -> None:
        if self.tokens % 77 or not 77 <= self.tokens <= 231:
            raise ConfigError(f"--tokens must be 77, 154 or 231 (whole 77-token chunks), got {self.tokens}")
        if self.height % 8 or self.width % 8:
            raise ConfigError(f"--res {self.height}x{self.width}: both sides must be multiples of 8")
        if self.device_batch < 1 or self.iters < 1 or self.warmup < 0:
            raise ConfigError("--device-batch and --iters must be >= 1, --warmup >= 0")
        if self.compile_scope not in ("blocks", "whole"):
            raise ConfigError(f"--compile-scope must be 'blocks' or 'whole', got {self.compile_scope!r}")
        precision_dtype(self.precision)


def synthetic_tokens(batch: int, n_chunks: int, generator: torch.Generator):
    """Full-length chunks ([BOS] + 75 random content ids + [EOS]) for both encoders."""
    from bigasp.text import BOS, EOS, chunk_batch

    content = torch.randint(0, BOS, (batch, 75 * n_chunks), generator=generator)
    content[content == EOS] = 0
    return chunk_batch(content.tolist(), max_chunks=n_chunks, min_chunks=n_chunks, warn=False)


@contextlib.contextmanager
def _single_rank_group(device: torch.device):
    """A one-process group so FSDP2 can be measured on one device (memory, overhead)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as d:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{os.path.join(d, 'pg')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def compile_counters() -> dict[str, int]:
    """Graphs dynamo compiled so far: with bucketed shapes this must stay bounded."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "frames": int(counters["frames"]["total"]),
    }


def apply_compile(unet: torch.nn.Module, scope: str) -> torch.nn.Module:
    """Regional compile (each resnet / transformer block once per shape) compiles in a fraction of
    whole-UNet time and reuses one graph for every repeat of a block; `whole` fuses across blocks."""
    if scope == "whole":
        return torch.compile(unet, dynamic=False)
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    for mod in unet.modules():
        if isinstance(mod, BasicTransformerBlock | ResnetBlock2D):
            mod.compile(dynamic=False)
    return unet


class TrainStepHarness:
    """The model, optimizer and one synthetic batch; `step()` is the timed unit."""

    def __init__(self, cfg: TrainBenchConfig, device: torch.device):
        from bigasp.models import build_preset
        from bigasp.models.conditioning import Crop, Size, sdxl_time_ids

        self.cfg, self.device = cfg, device
        self.dtype = precision_dtype(cfg.precision)
        self.amp = cfg.precision != "fp32" and not cfg.fsdp
        comps = ("unet", "text_encoder", "text_encoder_2")
        model = build_preset(cfg.preset, components=comps, seed=cfg.seed, device=device)
        self.unet, self.te1, self.te2 = model.unet, model.text_encoder, model.text_encoder_2
        self.unet.train().requires_grad_(True)
        self.te1.train(cfg.train_te1).requires_grad_(cfg.train_te1)
        # Frozen TE2 never needs fp32 master weights: store it in the compute dtype.
        self.te2.eval().requires_grad_(False).to(self.dtype if cfg.precision != "fp32" else torch.float32)
        if cfg.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if cfg.checkpointing:
            self.unet.enable_gradient_checkpointing()
            if cfg.train_te1:
                self.te1.gradient_checkpointing_enable()
        if cfg.fsdp:
            from bigasp.train.parallel import apply_fsdp2

            apply_fsdp2(self.unet, param_dtype=self.dtype if cfg.precision != "fp32" else None)
        from bigasp.train.denoiser import Denoiser
        from bigasp.train.objectives import Objective, ObjectiveConfig
        from bigasp.train.optim import build_optimizer

        # The trainer's own pieces: objective (noising, target, min-SNR weight), the denoiser
        # (both text encoders + UNet) and the optimizer (fused AdamW on CUDA).
        self.objective = Objective(ObjectiveConfig(prediction=cfg.prediction))
        self.denoiser = Denoiser(self.unet, self.te1, self.te2)
        groups = [("unet", list(self.unet.parameters()), cfg.lr)]
        if cfg.train_te1:
            groups.append(("text_encoder", list(self.te1.parameters()), cfg.lr))
        self.n_trainable = sum(p.numel() for _, ps, _ in groups for p in ps)
        self.opt = build_optimizer(groups)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

        g = torch.Generator().manual_seed(cfg.seed)
        b, h, w = cfg.device_batch, cfg.height // 8, cfg.width // 8
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.latents = torch.randn(b, 4, h, w, generator=g).to(device, memory_format=fmt)
        self.noise = torch.randn(b, 4, h, w, generator=g).to(device, memory_format=fmt)
        self.t = torch.rand(b, generator=g, dtype=torch.float64).to(device)
        tokens = synthetic_tokens(b, cfg.tokens // 77, g)
        self.tokens = replace(tokens, te1=tokens.te1.to(device), te2=tokens.te2.to(device))
        self.time_ids = (
            sdxl_time_ids(
                original_size=Size(cfg.height, cfg.width),
                crop=Crop(0, 0),
                target_size=Size(cfg.height, cfg.width),
            )
            .repeat(b, 1)
            .to(device)
        )

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.amp)

    def forward_backward(self) -> torch.Tensor:
        from bigasp.train.objectives import Objective

        with self._autocast():
            prep = self.objective.prepare(self.latents, self.noise, self.t)
            pred = self.denoiser(prep.x_t, prep.timesteps, self.tokens.te1, self.tokens.te2, self.time_ids)
        loss, _, _ = Objective.loss(pred, prep)
        self.scaler.scale(loss).backward()
        return loss

    def step(self) -> torch.Tensor:
        loss = self.forward_backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return loss  # never .item() here: no host sync in the hot loop


def run_train_bench(cfg: TrainBenchConfig, device: torch.device, command: str) -> BenchResult:
    cfg.validate()
    if cfg.fsdp:
        ctx = _single_rank_group(device)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        return _run(cfg, device, command)


def _run(cfg: TrainBenchConfig, device: torch.device, command: str) -> BenchResult:
    notes: list[str] = []
    t_build = time.perf_counter()
    h = TrainStepHarness(cfg, device)
    build_s = time.perf_counter() - t_build

    # Count once, eagerly, before compiling: compiled regions hide their ops from the counter.
    flops, _ = count_flops(h.forward_backward)
    h.opt.zero_grad(set_to_none=True)

    compile_s = None
    before = compile_counters() if cfg.compile else None
    if cfg.compile:
        h.unet = h.denoiser.unet = apply_compile(h.unet, cfg.compile_scope)
        t0 = time.perf_counter()
        h.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compile_s = time.perf_counter() - t0
        compiled = compile_counters()

    h.step()  # optimizer state exists from here on, so the peak below includes it
    with PeakMemory(device) as mem:
        seconds = time_iterations(h.step, device, warmup=cfg.warmup, iters=cfg.iters)
    loss = float(h.step().detach())  # one sync after timing: a NaN here means the bench is broken
    if loss != loss:
        notes.append("loss is NaN: the measured step diverged")

    stats = summarize(seconds)
    step_s = stats["median_s"]
    model_flops = flops.model  # MFU convention; `flops_counted` keeps torch's raw count
    achieved = model_flops / step_s / 1e12
    metrics: dict[str, Any] = {
        "img_per_s": cfg.device_batch / step_s,
        "ms_per_step": step_s * 1000,
        "flops_per_step": model_flops,
        "flops_counted": flops.total,
        "tflop_per_sample": model_flops / cfg.device_batch / 1e12,
        "flops_by_op": flops.by_op,
        "model_tflops": achieved,
        "mfu": achieved / cfg.peak_tflops if device.type == "cuda" else None,
        "mfu_pct": 100 * achieved / cfg.peak_tflops if device.type == "cuda" else None,
        "peak_tflops": cfg.peak_tflops,
        "trainable_params": h.n_trainable,
        "build_s": build_s,
        "compile_s": compile_s,
        "loss": loss,
        **{f"step_{k}": v for k, v in stats.items()},
        **mem.result(),
    }
    if cfg.compile:
        # Graphs made by the first (compiling) step; any frame compiled after it, in the warm-up
        # or timed steps at the same shapes, is a recompile (must be 0: guards are stable).
        after = compile_counters()
        metrics["compiled_graphs"] = compiled["unique_graphs"] - before["unique_graphs"]
        metrics["recompiles"] = after["frames"] - compiled["frames"]
    if device.type != "cuda":
        notes.append("MFU is n/a on CPU (no meaningful tensor-core peak)")
    mem_key = "peak_allocated_gib" if device.type == "cuda" else "peak_rss_gib"
    headline = [
        ("img_per_s", "img/s"),
        ("ms_per_step", "ms/step"),
        ("model_tflops", "TFLOP/s"),
        ("mfu_pct", "% MFU"),
    ]
    headline.append((mem_key, "GiB peak"))
    config = asdict(cfg)
    return BenchResult(
        bench="train",
        config=config,
        metrics=metrics,
        headline=headline,
        command=command,
        machine=machine_info(device),
        notes=notes,
    )
