"""Watermark flags and boxes from OWLv2, bigASP's way (watermark-detector/watermark-tagger.py).

bigASP skipped the processor's image path ("very slow") and prepared images by hand: paste at
(0, 0) on a grey (128, 128, 128) square — padding bottom/right, where official OWLv2 puts it —
resize bicubic to the model's input side (960), /255, CLIP mean/std. The processor is used
only for the text query ("a watermark", tokenized once) and for post-processing with
threshold 0.1. transformers' own `Owlv2ImageProcessor` also pads bottom/right but resizes
with a Gaussian-smoothed linear zoom (and, in transformers 5, pads with 0 rather than grey),
so its pixels differ; docs/annotate.md has the comparison.

Stored per image: the flag, the highest box score (to re-threshold without re-running), the
boxes as normalised xyxy relative to the padded square (bigASP's raw form), and the same
boxes in original-image pixels (x * max(w, h), clipped to the image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from bigasp.annotate.decode import pad_square
from bigasp.annotate.models import CLIP_MEAN, CLIP_STD, dtype_kwargs, local_folder, model_key, torch_dtype
from bigasp.annotate.provenance import model_provenance
from bigasp.errors import ModelLoadError

GREY = (128, 128, 128)


@dataclass
class WatermarkPrepare:
    """Worker side: the image at (0, 0) on a grey square, bicubic to `side`, uint8 [side, side, 3]."""

    side: int

    def __call__(self, im: Image.Image) -> np.ndarray:
        sq = pad_square(im, GREY, center=False)
        if sq.size != (self.side, self.side):
            sq = sq.resize((self.side, self.side), Image.Resampling.BICUBIC)
        return np.asarray(sq, dtype=np.uint8)


def boxes_to_image(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised xyxy on the (0, 0)-anchored padded square -> pixels of the original image."""
    side = max(width, height)
    px = np.asarray(boxes, np.float64).reshape(-1, 4) * side
    px[:, [0, 2]] = np.clip(px[:, [0, 2]], 0, width)
    px[:, [1, 3]] = np.clip(px[:, [1, 3]], 0, height)
    return px.astype(np.float32)


class Owlv2Watermark:
    stage = "watermark"

    def __init__(self, cfg, device):
        import torch
        from transformers import AutoTokenizer, Owlv2ForObjectDetection

        try:
            from transformers import Owlv2ImageProcessorPil as ImageProcessor
        except ImportError:  # transformers 4: the numpy/PIL processor has the plain name
            from transformers import Owlv2ImageProcessor as ImageProcessor

        path = local_folder(cfg.model, "watermark", ("config.json",))
        try:
            self.model = Owlv2ForObjectDetection.from_pretrained(
                str(path), local_files_only=True, **dtype_kwargs(torch_dtype(cfg.dtype))
            )
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load the OWLv2 folder {path}: {err}") from None
        self.post = ImageProcessor()
        self.dtype = torch_dtype(cfg.dtype)
        self.model = self.model.to(device, self.dtype).eval()
        self.device = device
        self.cfg = cfg
        self.key = model_key(path, cfg.key)
        self.input_side = int(self.model.config.vision_config.image_size)
        self.prepare = WatermarkPrepare(self.input_side)
        text = self.tokenizer([cfg.query], return_tensors="pt")
        self.input_ids = text["input_ids"].to(device)
        self.attention_mask = text["attention_mask"].to(device)
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        box = pa.list_(pa.float32(), 4)
        self.schema = pa.schema(
            [
                pa.field("watermark", pa.bool_()),
                pa.field("max_score", pa.float32()),
                pa.field("scores", pa.list_(pa.float32())),
                pa.field("boxes", pa.list_(box)),
                pa.field("boxes_px", pa.list_(box)),
            ]
        )
        self._provenance = model_provenance(
            path,
            stage="watermark",
            model_key=self.key,
            settings={"query": cfg.query, "threshold": cfg.threshold, "input_side": self.input_side,
                      "pad": "grey128_top_left", "resize": "bicubic", "dtype": cfg.dtype},
        )  # fmt: skip

    @property
    def provenance(self) -> dict[str, Any]:
        return self._provenance

    def pixel_values(self, batch: np.ndarray):
        import torch

        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        return ((x - self.mean) / self.std).to(self.dtype)

    def run(self, inputs: np.ndarray, sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
        import torch

        rows: list[dict[str, Any]] = []
        bs = self.cfg.batch_size
        for s in range(0, len(inputs), bs):
            chunk = inputs[s : s + bs]
            n = len(chunk)
            with torch.inference_mode():
                out = self.model(
                    input_ids=self.input_ids.expand(n, -1),
                    attention_mask=self.attention_mask.expand(n, -1),
                    pixel_values=self.pixel_values(chunk),
                )
                out.logits, out.pred_boxes = out.logits.float(), out.pred_boxes.float()
                best = torch.sigmoid(out.logits.max(dim=-1).values).max(dim=-1).values.cpu().numpy()
                results = self.post.post_process_object_detection(out, threshold=self.cfg.threshold)
            for k, res in enumerate(results):
                w, h = sizes[s + k]
                boxes = res["boxes"].cpu().numpy().astype(np.float32).reshape(-1, 4)
                rows.append(
                    {
                        "watermark": bool(len(boxes)),
                        "max_score": float(best[k]),
                        "scores": res["scores"].cpu().numpy().astype(np.float32).tolist(),
                        "boxes": boxes.tolist(),
                        "boxes_px": boxes_to_image(boxes, w, h).tolist(),
                    }
                )
        return rows

    def table(self, ids: list[str], rows: list[dict[str, Any]]) -> pa.Table:
        from bigasp.annotate.tags import _rows_table

        return _rows_table(ids, rows, self.schema)
