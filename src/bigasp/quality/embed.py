"""CLIP image embeddings the bigASP way: `hidden_states[-1][:, 0, :]` of the vision tower —
the CLS token of the last layer, before `post_layernorm` and without the projection — as fp16.

The quality stage needs this only for the degraded copies of rated images (their embeddings
are not in the dataset); the dataset's own embeddings come from `bigasp annotate`. Models load
from a local folder (a `CLIPVisionModel` or full `CLIPModel` plus its preprocessor config).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bigasp.errors import ModelLoadError


class ClipEmbedder:
    def __init__(self, path: str | Path, *, device: str = "cpu", batch_size: int = 32):
        import torch
        from transformers import CLIPVisionModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path}: no config.json; pass a local CLIP folder (e.g. a download of "
                "openai/clip-vit-base-patch32 with its preprocessor_config.json)"
            )
        try:
            self.model = CLIPVisionModel.from_pretrained(str(path)).to(device).eval()
            self.processor = _processor(path)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{path}: cannot load a CLIP vision model ({err})") from err
        self.device = device
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)
        self.name = str(path)
        self._torch = torch

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        torch = self._torch
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[i : i + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            with torch.no_grad():
                hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
            out.append(hidden[:, 0, :].float().cpu().numpy().astype(np.float16))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float16)


def _processor(path: Path):
    try:  # the PIL image processor: the default one needs torchvision, which bigasp avoids
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # older transformers: the default processor is the PIL one
        from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(str(path))
