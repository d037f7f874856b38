"""SDXL LoRAs at inference, loaded by diffusers + peft and merged into the weights.

diffusers' `StableDiffusionXLLoraLoaderMixin` reads both the kohya layout (`lora_unet_*`,
`lora_te1_*`, `lora_te2_*` with `.alpha`, the files shared on Civitai) and diffusers/peft's own
(`unet.*.lora_A/lora_B`), converting kohya's SGM block names with the UNet's config. Each file
becomes a named adapter; `set_adapters` gives each its weight and `fuse_lora` merges them all
(W += Σ weightᵢ · (alphaᵢ / rankᵢ) · upᵢ @ downᵢ), after which the adapter layers are removed, so
sampling runs on plain modules at full speed and bigasp's attention hooks (PAG) see the usual
layers.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from bigasp.errors import ConfigError
from bigasp.models.components import SDXL

log = logging.getLogger(__name__)


class LoraError(ConfigError):
    """A LoRA that cannot be merged into the model: the same for every checkpoint of a run, so the
    watcher stops on it instead of skipping checkpoint after checkpoint."""


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    weight: float = 1.0


def parse_lora(text: str) -> LoraSpec:
    """`FILE` or `FILE:WEIGHT` (the weight after the last colon, if it is a number)."""
    path, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass
    p = Path(path).expanduser()
    if weight != weight or abs(weight) > 100:
        raise ConfigError(f"--lora {text!r}: the weight must be a finite number within ±100")
    if not p.is_file():
        raise ConfigError(f"--lora {text!r}: {p} does not exist (expected a LoRA .safetensors file)")
    if p.suffix != ".safetensors":
        raise ConfigError(f"--lora {text!r}: bigasp reads only .safetensors LoRAs (never pickle files)")
    return LoraSpec(p, weight)


def lora_record(specs: list[LoraSpec]) -> list[tuple[str, float]]:
    """(file, weight) pairs as the PNG metadata and the watcher's done markers record them."""
    return [(str(s.path), s.weight) for s in specs]


def _host(model: SDXL):
    """The minimal object diffusers' SDXL LoRA loader works on: the three LoRA-able modules."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    class Host(StableDiffusionXLLoraLoaderMixin):
        hf_device_map = None

        def __init__(self, m: SDXL) -> None:
            self.unet, self.text_encoder, self.text_encoder_2 = m.unet, m.text_encoder, m.text_encoder_2

        @property
        def components(self) -> dict:
            return {
                "unet": self.unet,
                "text_encoder": self.text_encoder,
                "text_encoder_2": self.text_encoder_2,
            }

    return Host(model)


def _has_adapter(model: SDXL, name: str) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(
        isinstance(m, LoraLayer) and name in m.lora_A
        for c in ("unet", "text_encoder", "text_encoder_2")
        for m in getattr(model, c).modules()
    )


def apply_loras(model: SDXL, specs: list[LoraSpec]) -> SDXL:
    """Merge the LoRAs into `model`'s UNet and text encoders in place, each at its weight."""
    if not specs:
        return model
    try:
        import peft  # noqa: F401
    except ImportError:
        raise LoraError("--lora needs the peft package: pip install peft") from None
    from safetensors import SafetensorError

    from bigasp.models.adapter_files import is_lycoris, merge_lycoris

    host = _host(model)
    names = []
    for k, spec in enumerate(specs):
        try:
            lycoris = is_lycoris(spec.path)
        except (OSError, SafetensorError) as err:
            raise LoraError(f"--lora {spec.path}: not a readable .safetensors file ({err})") from None
        if lycoris:  # LoKr/LoHa: diffusers has no loader for these; merged by the kohya-layout formulas
            try:
                merge_lycoris(model, spec.path, spec.weight, f"--lora {spec.path}")
            except ConfigError as err:
                raise LoraError(str(err)) from None
            log.info("LyCORIS %s at weight %g", spec.path.name, spec.weight)
            continue
        name = f"lora{k}"
        try:
            with warnings.catch_warnings():  # several adapters in one model is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                host.load_lora_weights(str(spec.path), adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as err:
            raise LoraError(
                f"--lora {spec.path}: not an SDXL LoRA this model can load ({type(err).__name__}: {err})"
            ) from None
        if not _has_adapter(model, name):
            raise LoraError(f"--lora {spec.path}: none of its keys matches a layer of this model")
        names.append(name)
        log.info("LoRA %s at weight %g", spec.path.name, spec.weight)
    if names:
        weights = [s.weight for k, s in enumerate(specs) if f"lora{k}" in names]
        host.set_adapters(names, adapter_weights=weights)
        host.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], adapter_names=names)
        host.unload_lora_weights()
    return model
