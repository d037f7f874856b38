"""SDXL LoRAs at inference, loaded by diffusers + peft and merged into the weights.

diffusers' `StableDiffusionXLLoraLoaderMixin` reads both the kohya layout (`lora_unet_*`,
`lora_te1_*`, `lora_te2_*` with `.alpha`, the files shared on Civitai) and diffusers/peft's own
(`unet.*.lora_A/lora_B`), converting kohya's SGM block names with the UNet's config. Each file
becomes a named adapter; `set_adapters` gives each its weight and `fuse_lora` merges them all
(W += Σ weightᵢ · (alphaᵢ / rankᵢ) · upᵢ @ downᵢ; the UNet's and the text encoders' weights may
differ, as ComfyUI's LoraLoader strength_model/strength_clip), after which the adapter layers are removed, so
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
    """A LoRA file and its strengths: `weight` for the UNet, `clip_weight` for both text encoders
    (None = the same as `weight`), as ComfyUI's LoraLoader has strength_model and strength_clip."""

    path: Path
    weight: float = 1.0
    clip_weight: float | None = None

    @property
    def clip(self) -> float:
        """The text encoders' strength."""
        return self.weight if self.clip_weight is None else self.clip_weight


def _strip_weight(text: str) -> tuple[str, float | None]:
    """`HEAD:NUMBER` -> (HEAD, NUMBER); anything else -> (text, None)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, None


def parse_lora(text: str) -> LoraSpec:
    """`FILE`, `FILE:WEIGHT` or `FILE:W_MODEL:W_CLIP` (the weights after the last colons, if numbers).

    One weight applies to the UNet and both text encoders; with two, the first is the UNet's
    (ComfyUI's strength_model) and the second the text encoders' (strength_clip)."""
    path, last = _strip_weight(text)
    weights = [] if last is None else [last]
    if last is not None:
        head, first = _strip_weight(path)
        if first is not None:
            path, weights = head, [first, last]
    p = Path(path).expanduser()
    if any(w != w or abs(w) > 100 for w in weights):
        raise ConfigError(f"--lora {text!r}: the weights must be finite numbers within ±100")
    if not p.is_file():
        raise ConfigError(f"--lora {text!r}: {p} does not exist (expected a LoRA .safetensors file)")
    if p.suffix != ".safetensors":
        raise ConfigError(f"--lora {text!r}: bigasp reads only .safetensors LoRAs (never pickle files)")
    if len(weights) == 2:
        return LoraSpec(p, weights[0], None if weights[1] == weights[0] else weights[1])
    return LoraSpec(p, weights[0] if weights else 1.0)


def weights_label(weight: float, clip: float) -> str:
    """`W`, or `W_MODEL:W_CLIP` where the text encoders' weight differs: the `--lora` spelling, as
    the PNG's A1111 `LoRA` field and the watcher's gallery show it."""
    return f"{weight:g}" if clip == weight else f"{weight:g}:{clip:g}"


def lora_record(specs: list[LoraSpec]) -> list[dict]:
    """`{"file", "weight"}` per LoRA (plus `"weight_clip"` when the text encoders' strength differs),
    as the PNG metadata and the watcher's done markers record them."""
    out: list[dict] = []
    for s in specs:
        rec: dict = {"file": str(s.path), "weight": s.weight}
        if s.clip != s.weight:
            rec["weight_clip"] = s.clip
        out.append(rec)
    return out


def check_lora_file(path: Path) -> None:
    """Open the file as safetensors and read every tensor once: a damaged or lying header gets
    safetensors' own reason (as `--model` does), a NaN/inf weight names the file and the tensor.

    Both would otherwise surface much later and misleadingly: diffusers reports any unreadable
    file with one generic message, and a non-finite weight as NaN images blamed on cfg/pag."""
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has keys(), not iteration)
                t = f.get_tensor(key)
                if t.is_floating_point() and t.element_size() == 1:
                    t = t.float()  # float8: isfinite has no kernel for it
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise LoraError(
                        f"--lora {path}: tensor {key!r} holds {bad} NaN/inf value(s) of {t.numel()}; "
                        "the file is damaged (re-download it, or re-export it from a sound checkpoint)"
                    )
    except (SafetensorError, OSError) as err:
        raise LoraError(f"--lora {path} is not a readable .safetensors file: {err}") from None


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
        check_lora_file(spec.path)
        if is_lycoris(
            spec.path
        ):  # LoKr/LoHa: diffusers has no loader for these; merged by the kohya-layout formulas
            try:
                merge_lycoris(model, spec.path, spec.weight, f"--lora {spec.path}", clip_weight=spec.clip)
            except ConfigError as err:
                raise LoraError(str(err)) from None
            log.info("LyCORIS %s at weight %g (text encoders %g)", spec.path.name, spec.weight, spec.clip)
            continue
        name = f"lora{k}"
        diffusers_log = logging.getLogger("diffusers.loaders.peft")
        level = diffusers_log.level
        try:
            # diffusers logs a failed load before raising it; the one line below says it better
            diffusers_log.setLevel(logging.CRITICAL)
            with warnings.catch_warnings():  # several adapters in one model is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                host.load_lora_weights(str(spec.path), adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as err:
            text = " ".join(str(err).split())
            if "not found in the base model" in text:  # peft: no target module exists in SDXL
                raise LoraError(
                    f"--lora {spec.path}: its layers match no layer of this SDXL model ({text}); it is "
                    "for another architecture (SD 1.5, SD 2, Flux, ...)"
                ) from None
            raise LoraError(
                f"--lora {spec.path}: not an SDXL LoRA this model can load ({type(err).__name__}: {text})"
            ) from None
        finally:
            diffusers_log.setLevel(level)
        if not _has_adapter(model, name):
            raise LoraError(f"--lora {spec.path}: none of its keys matches a layer of this model")
        names.append(name)
        log.info("LoRA %s at weight %g (text encoders %g)", spec.path.name, spec.weight, spec.clip)
    if names:
        # Per component, and only for the components an adapter has (diffusers warns about the others).
        present = host.get_list_adapters()
        weights = [
            {c: s.weight if c == "unet" else s.clip for c, found in present.items() if name in found}
            for name, s in ((f"lora{k}", s) for k, s in enumerate(specs))
            if name in names
        ]
        host.set_adapters(names, adapter_weights=weights)
        host.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], adapter_names=names)
        host.unload_lora_weights()
    return model
