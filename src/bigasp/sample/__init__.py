"""Generation: ComfyUI-exact sampling of eps (bigASP v2) and flow (v2.5) SDXL models."""

from bigasp.sample.generate import PRESETS, GenerateSettings, Generator, read_png_metadata, save_png
from bigasp.sample.schedules import sigmas

__all__ = ["PRESETS", "GenerateSettings", "Generator", "read_png_metadata", "save_png", "sigmas"]
