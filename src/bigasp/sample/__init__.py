"""Generation: ComfyUI-exact sampling of eps (bigASP v2) and flow (v2.5) SDXL models.

Names are resolved lazily so that `bigasp --help` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bigasp._lazy import lazy_getattr

if TYPE_CHECKING:
    from bigasp.sample.generate import PRESETS, GenerateSettings, Generator, read_png_metadata, save_png
    from bigasp.sample.schedules import sigmas

__all__ = ["PRESETS", "GenerateSettings", "Generator", "read_png_metadata", "save_png", "sigmas"]

__getattr__ = lazy_getattr(
    __name__,
    {
        "PRESETS": "generate",
        "GenerateSettings": "generate",
        "Generator": "generate",
        "read_png_metadata": "generate",
        "save_png": "generate",
        "sigmas": "schedules",
    },
)
