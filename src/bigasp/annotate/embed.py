"""CLIP image embeddings for the quality model, as bigASP's embed.py made them.

Input: exactly the model folder's `CLIPImageProcessor` (resize shortest edge, centre crop,
CLIP mean/std) — the workers call the processor itself, so the pixels are the reference's.
Output: `hidden_states[-1][:, 0]`, the CLS token of the last layer *before* `post_layernorm`
and without the visual projection (768-d for ViT-B/32), stored as float16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from bigasp.annotate.models import dtype_kwargs, local_folder, model_key, torch_dtype
from bigasp.annotate.provenance import model_provenance
from bigasp.errors import ModelLoadError


@dataclass
class EmbedPrepare:
    """Worker side: the CLIPImageProcessor output for one image, float32 [3, H, W]."""

    processor: Any

    def __call__(self, im: Image.Image) -> np.ndarray:
        return self.processor(images=im, return_tensors="np")["pixel_values"][0].astype(np.float32)


class ClipEmbedder:
    stage = "embed"

    def __init__(self, cfg, device):
        from transformers import CLIPVisionModel

        try:  # transformers 5: the PIL/numpy processor (CLIPImageProcessor itself needs torchvision there)
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        except ImportError:  # transformers 4: CLIPImageProcessor is the PIL/numpy one
            from transformers import CLIPImageProcessor

        path = local_folder(cfg.model, "embed", ("config.json",))
        if not (path / "preprocessor_config.json").is_file():
            raise ModelLoadError(
                f"{path}: missing preprocessor_config.json (the CLIPImageProcessor settings of the model)"
            )
        try:
            self.processor = CLIPImageProcessor.from_pretrained(str(path), local_files_only=True)
            self.model = CLIPVisionModel.from_pretrained(
                str(path), local_files_only=True, **dtype_kwargs(torch_dtype(cfg.dtype))
            )
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load the CLIP model folder {path}: {err}") from None
        self.dtype = torch_dtype(cfg.dtype)
        self.model = self.model.to(device, self.dtype).eval()
        self.device = device
        self.cfg = cfg
        self.key = model_key(path, cfg.key)
        self.prepare = EmbedPrepare(self.processor)
        self.input_side = int(self.model.config.image_size)
        self.dim = int(self.model.config.hidden_size)
        self.schema = pa.schema([pa.field("embedding", pa.list_(pa.float16(), self.dim))])
        self._provenance = model_provenance(
            path,
            stage="embed",
            model_key=self.key,
            settings={"output": "cls_before_post_layernorm", "dtype": cfg.dtype},
        )

    @property
    def provenance(self) -> dict[str, Any]:
        return self._provenance

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(pixels).to(self.device, self.dtype)
        with torch.inference_mode():
            out = self.model(pixel_values=x, output_hidden_states=True)
        return out.hidden_states[-1][:, 0, :].float().cpu().numpy().astype(np.float16)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """Embed PIL images directly, `batch_size` at a time: the quality stage's blurred and
        JPEG copies of rated images, embedded exactly as the dataset's own images were."""
        out = [
            self.forward(
                np.stack([self.prepare(im.convert("RGB")) for im in images[i : i + self.cfg.batch_size]])
            )
            for i in range(0, len(images), self.cfg.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float16)

    def run(self, inputs: np.ndarray, sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
        vecs = self.forward(inputs)
        return [{"embedding": v} for v in vecs]

    def table(self, ids: list[str], rows: list[dict[str, Any]]) -> pa.Table:
        from bigasp.store.annotations import embeddings_table

        vecs = np.stack([r["embedding"] for r in rows]) if rows else np.zeros((0, self.dim), np.float16)
        return embeddings_table(ids, vecs)
