"""SDXL components: shipped presets, local loading/saving, text conditioning.

Names are resolved lazily so that `bigasp --help` (which imports `bigasp.models.commands`)
does not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bigasp.models.components import SDXL, ModelKind
    from bigasp.models.presets import PRESETS, build_preset, component_config

__all__ = ["PRESETS", "SDXL", "ModelKind", "build_preset", "component_config"]

_WHERE = {
    "SDXL": "components",
    "ModelKind": "components",
    "PRESETS": "presets",
    "build_preset": "presets",
    "component_config": "presets",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"bigasp.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'bigasp.models' has no attribute {name!r}")
