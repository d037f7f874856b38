"""SDXL components: shipped presets, local loading/saving, text conditioning."""

from bigasp.models.components import SDXL, ModelKind
from bigasp.models.presets import PRESETS, build_preset, component_config

__all__ = ["PRESETS", "SDXL", "ModelKind", "build_preset", "component_config"]
