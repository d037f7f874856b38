"""The SDXL model bundle and the metadata that says how it must be sampled.

`ModelKind` is saved beside every checkpoint (`bigasp_model.json`) so that generation
picks eps or flow sampling, and the flow shift, without flags (bigASP v2.5 could only be
run correctly by users who knew to add ModelSamplingSD3; bigasp records it instead).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bigasp.errors import ModelLoadError

if TYPE_CHECKING:  # torch only in annotations: `bigasp model info FILE` runs without importing it
    import torch

Prediction = Literal["eps", "flow"]
MODEL_KIND_FILE = "bigasp_model.json"
MODEL_KIND_VERSION = 1


@dataclass(frozen=True)
class ModelKind:
    """How the UNet was trained: `eps` (SDXL DDPM, bigASP v2) or `flow` (rectified flow, v2.5).

    `shift` is the flow timestep shift the model is meant to be sampled with by default
    (ComfyUI ModelSamplingSD3's `shift`); it is ignored for eps models. `train_shift` is the
    shift the model was trained at (`train.flow_shift`), recorded by the trainer; None when
    unknown (models from elsewhere) or eps.
    """

    prediction: Prediction = "eps"
    shift: float = 1.0
    train_shift: float | None = None

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "flow"):
            raise ModelLoadError(f"model kind prediction must be 'eps' or 'flow', got {self.prediction!r}")
        for name, v in (("shift", self.shift), ("train_shift", self.train_shift)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ModelLoadError(f"model kind {name} must be > 0 (and finite), got {v!r}")

    def to_json(self) -> dict[str, Any]:
        data = {"format_version": MODEL_KIND_VERSION, **asdict(self)}
        if data["train_shift"] is None:
            del data["train_shift"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "") -> ModelKind:
        try:
            train_shift = data.get("train_shift")
            return cls(
                prediction=data["prediction"],
                shift=float(data.get("shift", 1.0)),
                train_shift=None if train_shift is None else float(train_shift),
            )
        except KeyError:
            raise ModelLoadError(f"{source or 'model metadata'} has no 'prediction' field") from None

    def save(self, folder: str | Path) -> None:
        Path(folder, MODEL_KIND_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> ModelKind | None:
        path = Path(folder, MODEL_KIND_FILE)
        if not path.is_file():
            return None
        return cls.from_json(json.loads(path.read_text()), str(path))


@dataclass
class SDXL:
    """The four SDXL networks plus what kind of model they are.

    Any network may be None when a stage does not need it (training reads precomputed
    latents and never loads the VAE; encoding needs only the VAE).
    """

    unet: Any = None  # diffusers UNet2DConditionModel
    vae: Any = None  # diffusers AutoencoderKL
    text_encoder: Any = None  # transformers CLIPTextModel (ViT-L, 768)
    text_encoder_2: Any = None  # transformers CLIPTextModelWithProjection (bigG, 1280)
    kind: ModelKind = field(default_factory=ModelKind)
    source: str = ""  # where it came from, for messages and saved configs

    COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

    def modules(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self, n) for n in self.COMPONENTS if getattr(self, n) is not None}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> SDXL:
        for m in self.modules().values():
            m.to(device=device, dtype=dtype)
        return self
