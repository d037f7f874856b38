"""Lazy package exports, so `bigasp --help` does not import torch.

The CLI imports each stage's `commands` module to build its help; a package `__init__`
that imported its torch-heavy modules eagerly would make every `--help` pay seconds.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` resolving `name` from `package.<where[name]>` on first use."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
