"""bigasp: train bigASP-style SDXL finetunes at scale and generate images from them."""

__version__ = "0.1.0"
