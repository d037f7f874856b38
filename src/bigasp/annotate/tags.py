"""Image taggers run with onnxruntime: JoyTag and the WD v3 family, each with its own preprocessing.

Both pad the image to a centred square on white and resize it bicubic to the model's input
side (JoyTag's `prepare_image`, WD's `prepare_image` in SmilingWolf's wd-tagger app), so the
workers build one uint8 square for either. They differ after that:

- JoyTag (`model.onnx` + `top_tags.txt`): NCHW, /255, CLIP mean/std; the model's logits ->
  sigmoid (`tags.activation` when an export already ends in one);
  keep p > 0.4 (bigASP's tag-images.py), in `top_tags.txt` order.
- WD v3 (`model.onnx` + `selected_tags.csv`): NHWC float 0..255 in BGR order; the graph
  ends in a sigmoid; keep general tags (category 0) above 0.35 and character tags (4) above
  0.85, sorted by probability as the app does; the rating (9) is the most probable one.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from bigasp.annotate.decode import pad_square
from bigasp.annotate.models import CLIP_MEAN, CLIP_STD, local_folder, model_key
from bigasp.annotate.provenance import model_provenance
from bigasp.errors import ModelLoadError

WD_GENERAL, WD_CHARACTER, WD_RATING = 0, 4, 9


@dataclass
class TagPrepare:
    """Worker side: centred white-padded square, bicubic to `side`, uint8 [side, side, 3] RGB."""

    side: int

    def __call__(self, im: Image.Image) -> np.ndarray:
        sq = pad_square(im, (255, 255, 255), center=True)
        if sq.size != (self.side, self.side):
            sq = sq.resize((self.side, self.side), Image.Resampling.BICUBIC)
        return np.asarray(sq, dtype=np.uint8)


def joytag_input(batch: np.ndarray) -> np.ndarray:
    """uint8 [B, S, S, 3] -> float32 NCHW, /255 then CLIP mean/std (JoyTag's prepare_image)."""
    x = batch.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def wd_input(batch: np.ndarray) -> np.ndarray:
    """uint8 [B, S, S, 3] RGB -> float32 NHWC BGR in 0..255 (the WD tagger app's prepare_image)."""
    return np.ascontiguousarray(batch.astype(np.float32)[..., ::-1])


def _read_tags(path: Path, kind: str) -> tuple[list[str], np.ndarray]:
    if kind == "joytag":
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        while names and not names[-1]:
            names.pop()
        return names, np.zeros(len(names), np.int32)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "name" not in rows[0] or "category" not in rows[0]:
        raise ModelLoadError(f"{path}: expected a CSV with 'name' and 'category' columns (WD tagger layout)")
    return [r["name"] for r in rows], np.array([int(r["category"]) for r in rows], np.int32)


class OnnxTagger:
    stage = "tags"

    def __init__(self, cfg, device):
        path = local_folder(cfg.model, "tags", ("model.onnx",))
        kind = cfg.kind
        if kind == "auto":
            if (path / "top_tags.txt").is_file():
                kind = "joytag"
            elif (path / "selected_tags.csv").is_file():
                kind = "wd"
            else:
                raise ModelLoadError(
                    f"{path}: no tag list (top_tags.txt for JoyTag or selected_tags.csv for a WD tagger)"
                )
        tag_file = path / ("top_tags.txt" if kind == "joytag" else "selected_tags.csv")
        if not tag_file.is_file():
            raise ModelLoadError(f"{path}: missing {tag_file.name} (tags.kind = {kind!r})")
        self.names, self.categories = _read_tags(tag_file, kind)
        self.kind = kind
        self.cfg = cfg
        self.session = _session(path / "model.onnx", cfg.provider, device)
        inp = self.session.get_inputs()[0]
        out = self.session.get_outputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4:
            raise ModelLoadError(f"{path}/model.onnx: expected a 4-d image input, got shape {shape}")
        self.nchw = shape[1] == 3
        side = shape[2] if self.nchw else shape[1]
        if not isinstance(side, int):
            side = 448
        self.input_name = inp.name
        self.input_side = int(side)
        n_out = out.shape[-1] if out.shape else None
        if isinstance(n_out, int) and n_out != len(self.names):
            raise ModelLoadError(
                f"{path}/model.onnx outputs {n_out} tag scores but {tag_file.name} lists {len(self.names)} tags; "
                "the tag list does not belong to this model"
            )
        act = cfg.activation if cfg.activation != "auto" else ("sigmoid" if kind == "joytag" else "none")
        self.activation = act
        self.key = model_key(path, cfg.key)
        self.prepare = TagPrepare(self.input_side)
        self.schema = pa.schema(
            [
                pa.field("tags", pa.list_(pa.string())),
                pa.field("probs", pa.list_(pa.float32())),
                pa.field("rating", pa.string()),
            ]
        )
        settings: dict[str, Any] = {"kind": kind, "activation": act, "input_side": self.input_side}
        if kind == "joytag":
            settings["threshold"] = cfg.threshold
        else:
            settings.update(
                general_threshold=cfg.general_threshold, character_threshold=cfg.character_threshold
            )
        self._provenance = model_provenance(path, stage="tags", model_key=self.key, settings=settings)

    @property
    def provenance(self) -> dict[str, Any]:
        return self._provenance

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        x = joytag_input(batch) if self.kind == "joytag" and self.nchw else wd_input(batch)
        if self.kind == "joytag" and not self.nchw:
            x = joytag_input(batch).transpose(0, 2, 3, 1)
        if self.kind == "wd" and self.nchw:
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        y = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0].astype(np.float32)
        if y.shape[-1] != len(self.names):
            raise ModelLoadError(
                f"the tagger returned {y.shape[-1]} scores per image for {len(self.names)} tags in its tag list"
            )
        return 1.0 / (1.0 + np.exp(-y)) if self.activation == "sigmoid" else y

    def select(self, p: np.ndarray) -> dict[str, Any]:
        """One image's probabilities -> kept tags (with probabilities) and rating."""
        if self.kind == "joytag":
            keep = np.flatnonzero(p > self.cfg.threshold)
            return {"tags": [self.names[i] for i in keep], "probs": p[keep].tolist(), "rating": None}
        cat = self.categories
        general = (cat == WD_GENERAL) & (p > self.cfg.general_threshold)
        character = (cat == WD_CHARACTER) & (p > self.cfg.character_threshold)
        keep = np.flatnonzero(general | character)
        keep = keep[np.argsort(-p[keep], kind="stable")]
        ratings = np.flatnonzero(cat == WD_RATING)
        rating = self.names[ratings[np.argmax(p[ratings])]] if len(ratings) else None
        return {"tags": [self.names[i] for i in keep], "probs": p[keep].tolist(), "rating": rating}

    def run(self, inputs: np.ndarray, sizes: list[tuple[int, int]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for s in range(0, len(inputs), self.cfg.batch_size):
            probs = self.probabilities(inputs[s : s + self.cfg.batch_size])
            out.extend(self.select(p) for p in probs)
        return out

    def table(self, ids: list[str], rows: list[dict[str, Any]]) -> pa.Table:
        return _rows_table(ids, rows, self.schema)


def _rows_table(ids: list[str], rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    full = pa.schema([pa.field("id", pa.string(), nullable=False), *schema])
    return pa.Table.from_pylist([{"id": i, **r} for i, r in zip(ids, rows, strict=True)], schema=full)


def _session(path: Path, provider: str, device):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError(
            "the tags stage needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu)"
        ) from None
    available = ort.get_available_providers()
    use_cuda = provider == "cuda" or (
        provider == "auto"
        and getattr(device, "type", "cpu") == "cuda"
        and "CUDAExecutionProvider" in available
    )
    if use_cuda and "CUDAExecutionProvider" not in available:
        raise ModelLoadError(
            "tags.provider = 'cuda' but onnxruntime has no CUDA provider; install onnxruntime-gpu"
        )
    providers: list[Any] = ["CPUExecutionProvider"]
    if use_cuda:
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": getattr(device, "index", 0) or 0}))
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types for bad files
        raise ModelLoadError(f"{path}: onnxruntime cannot load it ({type(err).__name__}: {err})") from None
