"""AdamW over the trainable parts, one parameter group per component (own lr each).

bigASP v2: AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 0.1, lr 1e-4, with text encoder 1
trained. kohya-style separate text-encoder learning rates are a parameter group each; the
schedule multiplies every group's base lr (`initial_lr`) by the same factor.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


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


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier
