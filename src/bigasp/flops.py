"""FLOP counting for MFU, shared by `bigasp bench` and the trainer: counted from the ops that
actually ran (or would run, on `meta`), never assumed.

Convention (the usual MFU one, as in ../shared/reference/performance.md): 2 FLOPs per
multiply-accumulate in matmuls, convolutions and attention; elementwise ops, norms and the
optimizer are not counted; attention backward counts 2x its forward like every other matmul
(`FlopCount.model`); gradient-checkpointing recompute is not counted. `count_flops` uses
torch's `FlopCounterMode` (aten-level), after teaching it the CPU flash-attention ops it does
not know, so a CPU count of an SDPA model is not silently missing its attention.
`ModuleFlopCounter` is an independent count from module shapes (forward hooks on Linear /
Conv / diffusers Attention); tests check the two agree. `TrainFlops` is the trainer's
per-batch-shape count: one real forward + backward of meta copies of the networks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter as fc

aten = torch.ops.aten


def linear_flops(n_rows: int, in_features: int, out_features: int) -> int:
    """`y = x W^T (+ b)` over `n_rows` rows (bias adds are not counted)."""
    return 2 * n_rows * in_features * out_features


def conv2d_flops(
    batch: int, c_in: int, c_out: int, kernel: tuple[int, int], out_hw: tuple[int, int], groups: int = 1
) -> int:
    return 2 * batch * out_hw[0] * out_hw[1] * c_out * (c_in // groups) * kernel[0] * kernel[1]


def attention_flops(
    batch: int, heads: int, q_len: int, k_len: int, head_dim: int, v_dim: int | None = None
) -> int:
    """`softmax(QK^T) V`: two batched matmuls (the softmax itself is not counted)."""
    v_dim = head_dim if v_dim is None else v_dim
    return 2 * batch * heads * q_len * k_len * head_dim + 2 * batch * heads * q_len * k_len * v_dim


_CPU_SDPA_REGISTERED = False


def register_cpu_sdpa() -> None:
    """Teach FlopCounterMode the CPU flash-attention ops (torch 2.13 counts only the GPU ones).

    Without this, a CPU count of any SDPA model misses its attention entirely. Idempotent.
    """
    global _CPU_SDPA_REGISTERED
    if _CPU_SDPA_REGISTERED:
        return
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:

        @fc.register_flop_formula(fwd)
        def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in fc.flop_registry:

        @fc.register_flop_formula(bwd)
        def _cpu_sdpa_bwd(
            grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
        ) -> int:
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    _CPU_SDPA_REGISTERED = True


# torch counts a flash-attention backward as 2.5x its forward (it recomputes QK^T); the MFU
# convention (and ../shared/reference/performance.md's 3.00x fwd+bwd) counts 2x.
_SDPA_BWD_MODEL_FRACTION = 2.0 / 2.5


@dataclass
class FlopCount:
    """`total`: every counted op as torch's formulas count it (hardware-ish). `model`: the MFU
    convention, where attention backward is 2x its forward like every other matmul."""

    total: int
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def model(self) -> int:
        sdpa_bwd = sum(n for op, n in self.by_op.items() if "attention" in op and "backward" in op)
        return self.total - sdpa_bwd + round(sdpa_bwd * _SDPA_BWD_MODEL_FRACTION)

    @property
    def tflop(self) -> float:
        return self.total / 1e12


def count_flops(fn: Callable[[], Any]) -> tuple[FlopCount, Any]:
    """Run `fn()` once under FlopCounterMode; returns (count, fn's result)."""
    register_cpu_sdpa()
    mode = fc.FlopCounterMode(display=False)
    with mode:
        out = fn()
    by_op = {
        str(op).removeprefix("aten."): int(n) for op, n in mode.get_flop_counts().get("Global", {}).items()
    }
    return FlopCount(int(mode.get_total_flops()), by_op), out


class ModuleFlopCounter:
    """Forward FLOPs from module input/output shapes: nn.Linear, nn.Conv2d, diffusers Attention.

    A second, independent count (shapes and formulas above, no aten dispatch) to check
    `count_flops` against. Attention cores are counted from the Attention module's heads and
    the lengths of its query and key sequences; its projections are the Linear layers inside.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.total = 0
        self.by_kind: dict[str, int] = {"linear": 0, "conv": 0, "attention": 0}
        self._handles: list[Any] = []

    def _add(self, kind: str, n: int) -> None:
        self.total += n
        self.by_kind[kind] += n

    def _linear(self, mod: nn.Linear, args, out) -> None:
        x = args[0]
        self._add("linear", linear_flops(x.numel() // x.shape[-1], mod.in_features, mod.out_features))

    def _conv(self, mod: nn.Conv2d, args, out) -> None:
        x = args[0]
        self._add(
            "conv",
            conv2d_flops(
                x.shape[0], mod.in_channels, mod.out_channels, mod.kernel_size, out.shape[-2:], mod.groups
            ),
        )

    def _attention(self, mod: nn.Module, args, kwargs, out) -> None:
        hs = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if hs.ndim == 4:  # spatial input [B, C, H, W] (VAE mid-block attention)
            b, q_len = hs.shape[0], hs.shape[2] * hs.shape[3]
        else:
            b, q_len = hs.shape[0], hs.shape[1]
        if ctx is None:
            k_len = q_len
        else:
            k_len = ctx.shape[2] * ctx.shape[3] if ctx.ndim == 4 else ctx.shape[1]
        inner = mod.to_q.out_features
        heads = mod.heads
        self._add("attention", attention_flops(b, heads, q_len, k_len, inner // heads))

    def __enter__(self) -> ModuleFlopCounter:
        from diffusers.models.attention_processor import Attention

        for mod in self.model.modules():
            if isinstance(mod, nn.Linear):
                self._handles.append(mod.register_forward_hook(self._linear))
            elif isinstance(mod, nn.Conv2d):
                self._handles.append(mod.register_forward_hook(self._conv))
            elif isinstance(mod, Attention):
                self._handles.append(mod.register_forward_hook(self._attention, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ---------------------------------------------------------------------------------------------
# The trainer's count: per batch shape, forward + backward on meta copies


def meta_copy(module: nn.Module) -> nn.Module:
    """An empty (`meta`) module of the same class and config, with the same `requires_grad` per
    parameter, so a backward through it takes exactly the real model's gradient paths."""
    with torch.device("meta"):
        if hasattr(module, "from_config") and hasattr(module, "config"):  # diffusers
            copy = type(module).from_config(module.config)
        else:  # transformers
            copy = type(module)(module.config)
    trains = dict((n, p.requires_grad) for n, p in module.named_parameters())
    for name, p in copy.named_parameters():
        p.requires_grad_(trains.get(name, False))
    return copy.train(module.training)


class TrainFlops:
    """Model FLOPs per training sample of an SDXL denoiser, cached per (latent h, w, chunks).

    Counted like `bigasp bench train` counts a step: one forward + backward through the real
    module graph (on `meta`: no memory, no compute on the accelerator), so only the gradients
    the step really computes are counted: none for frozen parts, none for TE1's unused last
    layer, and no input gradient for the UNet's conv_in (latents need none). This is why the
    trainer does not use the "trained = 3x forward" shortcut: it overcounted the tiny preset
    by 3.6%. At SDXL scale the two agree to 0.03% (21.199 vs 21.206 TFLOP per sample at 1024²,
    3 chunks, TE1 trained; reference 21.20). Counted at batch 1: FLOPs are linear in batch.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module):
        self._modules = (unet, text_encoder, text_encoder_2)
        self._meta: nn.Module | None = None
        self._cache: dict[tuple[int, int, int], float] = {}

    def per_sample(self, h: int, w: int, n_chunks: int) -> float:
        """Training FLOPs of one sample with a [C, h, w] latent and `n_chunks` prompt chunks."""
        key = (h, w, n_chunks)
        if key not in self._cache:
            self._cache[key] = float(self.count(h, w, n_chunks).model)
        return self._cache[key]

    def per_batch(self, batch) -> float:
        b, _, h, w = batch.latents.shape
        return b * self.per_sample(int(h), int(w), int(batch.te1_ids.shape[1]))

    def count(self, h: int, w: int, n_chunks: int) -> FlopCount:
        from bigasp.train.denoiser import Denoiser

        if self._meta is None:
            self._meta = Denoiser(*(meta_copy(m) for m in self._modules))
        den = self._meta
        channels = den.unet.config.in_channels

        def forward_backward() -> None:
            with torch.device("meta"), torch.enable_grad():
                ids = torch.zeros(1, n_chunks, 77, dtype=torch.long)
                x = torch.zeros(1, channels, h, w)
                pred = den(x, torch.zeros(1), ids, ids, torch.zeros(1, 6))
                if pred.requires_grad:
                    pred.float().sum().backward()

        counted, _ = count_flops(forward_backward)
        return counted
