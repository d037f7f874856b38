"""The optimizer over the trainable parts, one parameter group per component (own lr each).

bigASP v2: AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 0.1, lr 1e-4, with text encoder 1
trained. kohya-style separate text-encoder learning rates are a parameter group each; the
schedule multiplies every group's base lr (`initial_lr`) by the same factor. The memory-lean
choices come from maintained libraries: Adafactor from transformers, 8-bit AdamW from
bitsandbytes (docs/training.md, "Memory-lean full finetune").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from bigasp.errors import ConfigError


def build_optimizer(
    groups: Iterable[tuple[str, list[torch.nn.Parameter], float]],
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with one group per (name, params, lr). `fused=None` = fused when every param is on CUDA.

    The fused CUDA kernel is the fastest AdamW; on CPU the default (foreach) path is used so CPU
    runs stay bitwise reproducible across torch builds with and without fused CPU kernels.
    """
    param_groups = []
    all_params: list[torch.nn.Parameter] = []
    for name, params, lr in groups:
        params = [p for p in params if p.requires_grad]
        if not params:
            continue
        param_groups.append({"params": params, "lr": lr, "initial_lr": lr, "name": name})
        all_params.extend(params)
    if not param_groups:
        raise ValueError("nothing to train: every component is frozen")
    if fused is None:
        fused = all(p.is_cuda for p in all_params)
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(param_groups, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)


def make_optimizer(
    kind: str,
    groups: Iterable[tuple[str, list[torch.nn.Parameter], float]],
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names, with the same groups as `build_optimizer`.

    adafactor: transformers' Adafactor driven by our lr schedule (relative_step, scale_parameter and
    warmup_init off, as kohya recommends for SDXL finetunes), no first moment (beta1 None: the
    memory saving), factored second moment; its own defaults otherwise (eps (1e-30, 1e-3), update
    clipping at RMS 1, decay rate -0.8). adamw8bit / paged_adamw8bit: bitsandbytes' blockwise 8-bit
    AdamW with the config's betas, eps and decoupled weight decay."""
    if kind == "adamw":
        return build_optimizer(groups, betas=betas, eps=eps, weight_decay=weight_decay)
    param_groups = _param_groups(groups)
    if kind == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(
            param_groups,
            lr=param_groups[0]["lr"],
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            beta1=None,
            weight_decay=weight_decay,
        )
        return opt
    if kind in ("adamw8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                f"train.optimizer = '{kind}' needs the bitsandbytes package; install it with "
                "`pip install bitsandbytes` (or pip install 'bigasp[lean]'), or use train.optimizer = 'adafactor'"
            ) from None
        cls = bnb.optim.PagedAdamW8bit if kind == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return cls(param_groups, lr=param_groups[0]["lr"], betas=betas, eps=eps, weight_decay=weight_decay)
    raise ConfigError(
        f"train.optimizer = {kind!r} is not one of adamw, adafactor, adamw8bit, paged_adamw8bit"
    )


def _param_groups(groups: Iterable[tuple[str, list[torch.nn.Parameter], float]]) -> list[dict[str, Any]]:
    out = []
    for name, params, lr in groups:
        params = [p for p in params if p.requires_grad]
        if params:
            out.append({"params": params, "lr": lr, "initial_lr": lr, "name": name})
    if not out:
        raise ValueError("nothing to train: every component is frozen")
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict`, keeping every saved state tensor's dtype.

    torch casts floating state to its parameter's dtype on load: bf16 trained weights keep fp32
    optimizer state (see bigasp.train.lean), and bitsandbytes keeps uint8 codes, so that cast would
    round or destroy them. Tensors whose dtype the load changed are put back exactly as saved."""
    optimizer.load_state_dict(state)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, saved in state["state"].items():
        current = optimizer.state[params[pid]]
        inner = [kv for v in saved.values() if isinstance(v, dict) for kv in v.items()]  # bitsandbytes
        for key, value in [*saved.items(), *inner]:
            now = current.get(key)
            if isinstance(value, torch.Tensor) and isinstance(now, torch.Tensor) and now.dtype != value.dtype:
                current[key] = value.to(now.device).clone()


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier
