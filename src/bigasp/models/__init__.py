"""SDXL components: shipped presets, local loading/saving, text conditioning.

Names are resolved lazily so that `bigasp --help` (which imports `bigasp.models.commands`)
does not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bigasp._lazy import lazy_getattr

if TYPE_CHECKING:
    from bigasp.models.components import SDXL, ModelKind
    from bigasp.models.presets import PRESETS, build_preset, component_config

__all__ = ["PRESETS", "SDXL", "ModelKind", "build_preset", "component_config"]

__getattr__ = lazy_getattr(
    __name__,
    {
        "SDXL": "components",
        "ModelKind": "components",
        "PRESETS": "presets",
        "build_preset": "presets",
        "component_config": "presets",
    },
)
