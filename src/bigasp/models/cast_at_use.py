"""Keep a module's weights in their stored precision and compute in a wider one.

An fp16 SDXL file run in fp32 (generation on a CPU) would otherwise hold every weight twice as
large as the file: the four networks are 12.9 GiB in fp32 against 6.5 GiB as stored. Here each
parameter stays as stored and is widened when its layer reads it (torch's parametrizations), so
only the layer at work has an fp32 copy. Widening fp16 or bf16 to fp32 is exact, so every layer
sees the same fp32 weights as a module cast up front: the image is bitwise the same.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

_MARK = "bigasp_compute_dtype"


class Widen(torch.nn.Module):
    """The parametrization: the stored tensor, widened to `dtype` (a fresh copy per read)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)


def exact_widening(stored: torch.dtype, compute: torch.dtype) -> bool:
    """Whether every `stored` value is exactly representable in `compute` (fp16/bf16 -> fp32)."""
    if not (stored.is_floating_point and compute.is_floating_point) or stored == compute:
        return False
    s, c = torch.finfo(stored), torch.finfo(compute)
    return c.bits > s.bits and c.eps <= s.eps and c.max >= s.max and c.tiny <= s.smallest_normal


def cast_at_use(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Make `module` compute in `dtype` while parameters stored narrower stay as stored.

    Parameters whose widening to `dtype` is not exact are left alone (the caller casts them as
    before). Returns the number of parameters widened at use."""
    widen = Widen(dtype)
    count = 0
    for sub in list(module.modules()):
        for name, p in list(sub.named_parameters(recurse=False)):
            if exact_widening(p.dtype, dtype):
                # unsafe: the parametrization changes the dtype, which torch otherwise forbids.
                parametrize.register_parametrization(sub, name, widen, unsafe=True)
                count += 1
    if count:
        setattr(module, _MARK, dtype)
    return count


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype `module` computes in: the widened one, else its first parameter's."""
    return getattr(module, _MARK, None) or next(module.parameters()).dtype


def drop_cast_at_use(module: torch.nn.Module) -> None:
    """Undo `cast_at_use`: parameters become their stored tensors again."""
    for sub in list(module.modules()):
        if parametrize.is_parametrized(sub):
            for name in list(sub.parametrizations):  # type: ignore[union-attr]
                parametrize.remove_parametrizations(sub, name, leave_parametrized=False)
    if hasattr(module, _MARK):
        delattr(module, _MARK)


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters hold as stored (widened copies are transient)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
