"""Text-to-image for bigASP models: load once, generate many, as ComfyUI would.

The pipeline is ComfyUI's KSampler on an empty latent: initial noise from
`torch.manual_seed(seed)` as one CPU float32 `randn` over the whole batch latent, scaled
by the model's `noise_scaling`; a ComfyUI schedule; a k-diffusion sampler over a guided
denoiser (CFG + PAG), SDE samplers with ComfyUI's Brownian-tree noise (one tree per prompt,
so an image never depends on the other prompts of a call); latent ÷ VAE scaling factor; VAE decode (fp32 by default: SDXL's
VAE overflows in fp16); `clamp((x+1)/2)`, ×255 and truncation to uint8. Same settings and
seed give the same image.

Settings presets encode the model cards: `bigasp-v2.5` (flow: euler, beta, CFG 3 + PAG 2,
negative "low quality") and `bigasp-v2` (eps: DPM++ 2M SDE, karras, 40 steps, CFG 3).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from bigasp import progress
from bigasp.config import Section
from bigasp.errors import BigaspError, ConfigError
from bigasp.fsutil import atomic_path
from bigasp.models.components import SDXL, ModelKind
from bigasp.sample.embeddings import EmbeddingLibrary
from bigasp.sample.guidance import Conditioning, GuidedDenoiser, perturbed_attention
from bigasp.sample.lora import LoraSpec, lora_record, weights_label
from bigasp.sample.model_sampling import max_denoise, model_sampling
from bigasp.sample.names import SAMPLER_DISPLAY, SCHEDULER_DISPLAY, normalize_sampler, normalize_scheduler
from bigasp.sample.prompts import encode_weighted, prompt_chunks
from bigasp.sample.samplers import (
    STOCHASTIC,
    brownian_noise_sampler,
    iid_noise_sampler,
    keyed_noise_sampler,
    run_sampler,
)
from bigasp.sample.schedules import schedule

log = logging.getLogger(__name__)

SamplerName = Literal["euler", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"]
SchedulerName = Literal["normal", "simple", "sgm_uniform", "beta", "karras", "exponential"]
SDE_SEED_KEY = 0x5DEECE66D  # keeps i.i.d. SDE noise independent of the initial noise for a seed


MAX_SIDE = 4096  # 4x SDXL's native 1024; beyond it the UNet's attention runs out of memory


def check_size(width: int, height: int) -> None:
    """SDXL latents are 1/8 of the image: both sides must be multiples of 8, at most MAX_SIDE."""
    for name, v in (("width", width), ("height", height)):
        if v > MAX_SIDE:
            raise ConfigError(
                f"{name} {v} is larger than {MAX_SIDE} pixels; SDXL works best near 1 megapixel "
                "(e.g. 832x1216): generate smaller and upscale"
            )
        if v % 8 or v < 8:
            lo, hi = max(8, v - v % 8), v - v % 8 + 8
            if v < 8:
                raise ConfigError(f"{name} {v} is too small; use at least 64 (SDXL works best near 1024)")
            raise ConfigError(
                f"{name} {v} is not a multiple of 8 (SDXL latents are 1/8 of the image size); "
                f"use {lo} or {hi}, ideally a multiple of 64 such as {max(64, round(v / 64) * 64)}."
            )


class GenerateSettings(Section):
    """Everything that determines an image besides the prompt and the weights."""

    negative: str = Field("low quality", description="Negative prompt (bigASP cards: 'low quality').")
    steps: int = Field(30, ge=1, le=1000, description="Sampling steps (beta may run fewer: de-duplication).")
    cfg: float = Field(
        3.0,
        ge=-100,
        le=100,
        allow_inf_nan=False,
        description="CFG scale in denoised space; 1.0 skips the negative pass.",
    )
    pag: float = Field(
        2.0,
        ge=0.0,
        le=100,
        allow_inf_nan=False,
        description="Perturbed-Attention Guidance scale; 0 disables it.",
    )
    sampler: SamplerName = Field(
        "euler", description="ComfyUI sampler name; A1111 spellings (`DPM++ 2M SDE`, `Euler`) are accepted."
    )
    scheduler: SchedulerName = Field(
        "beta",
        description="ComfyUI scheduler name; A1111 schedule types (`Karras`, `SGM Uniform`) are accepted.",
    )
    shift: float | None = Field(
        None,
        gt=0,
        le=1000,
        allow_inf_nan=False,
        description="Flow shift (ModelSamplingSD3); None = from the model.",
    )
    prediction: Literal["eps", "flow"] | None = Field(
        None, description="Override the model kind (eps = bigASP v2 / SDXL, flow = bigASP v2.5)."
    )
    width: int = Field(
        832,
        ge=8,
        le=MAX_SIDE,
        description="Image width in pixels, multiple of 8 (64 recommended), at most 4096.",
    )
    height: int = Field(
        1216,
        ge=8,
        le=MAX_SIDE,
        description="Image height in pixels, multiple of 8 (64 recommended), at most 4096.",
    )
    seed: int = Field(0, ge=0, lt=2**63, description="Noise seed (ComfyUI-compatible).")
    batch: int = Field(1, ge=1, description="Images per prompt (one noise tensor over the batch).")
    syntax: Literal["comfy", "a1111", "none"] = Field("comfy", description="Prompt weight syntax.")
    chunking: Literal["comfy", "bigasp"] = Field(
        "comfy",
        description="75-token chunk boundaries: ComfyUI's rule (a short weighted segment that would "
        "cross a boundary moves whole to the next chunk), or bigasp = the plain split bigASP trained "
        "with. The two agree for prompts without weights or embeddings.",
    )
    embeddings: str | None = Field(
        None,
        description="Folder of textual-inversion embeddings (.safetensors, searched with its "
        "subfolders) for ComfyUI's `embedding:NAME` syntax; a missing embedding is dropped with a warning.",
    )
    noise: Literal["brownian", "iid"] = Field(
        "brownian",
        description="SDE noise: torchsde's Brownian tree seeded with `seed` (ComfyUI's default), or "
        "i.i.d. normal. Either way one prompt's images never depend on the other prompts in a call.",
    )

    @field_validator("sampler", mode="before")
    @classmethod
    def _sampler_spelling(cls, value: Any) -> Any:
        return normalize_sampler(value) if isinstance(value, str) else value

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_spelling(cls, value: Any) -> Any:
        return normalize_scheduler(value) if isinstance(value, str) else value

    def check(self) -> None:
        """Raise a ConfigError for settings that cannot produce an image."""
        check_size(self.width, self.height)
        if self.width % 64 or self.height % 64:
            log.warning(
                "size %dx%d is not a multiple of 64; SDXL works best with 64", self.width, self.height
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GenerateSettings:
        if name not in PRESETS:
            raise ConfigError(f"unknown generation preset {name!r}; choose one of {', '.join(PRESETS)}")
        data = {**PRESETS[name]["settings"], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**data)


PRESETS: dict[str, dict[str, Any]] = {
    # bigASP v2.5 card: euler, shift 1.0 + beta, PAG ~2 with CFG 2-5, negative "low quality".
    "bigasp-v2.5": {
        "prediction": "flow",
        "settings": {"sampler": "euler", "scheduler": "beta", "steps": 30, "cfg": 3.0, "pag": 2.0},
    },
    # bigASP v2 card: DPM++ 2M SDE (or 3M SDE), karras (or exponential), 40 steps, CFG 2-3.
    "bigasp-v2": {
        "prediction": "eps",
        "settings": {"sampler": "dpmpp_2m_sde", "scheduler": "karras", "steps": 40, "cfg": 3.0, "pag": 0.0},
    },
}


def preset_for(kind: ModelKind) -> str:
    return "bigasp-v2.5" if kind.prediction == "flow" else "bigasp-v2"


def resolve_kind(model_kind: ModelKind, settings: GenerateSettings) -> ModelKind:
    """The model's recorded kind with the settings' overrides applied."""
    kind = model_kind
    if settings.prediction is not None:
        kind = replace(kind, prediction=settings.prediction)
    if settings.shift is not None:
        kind = replace(kind, shift=settings.shift)
    return kind


def initial_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """ComfyUI `prepare_noise`: the CPU generator seeded like `torch.manual_seed(seed)`, one randn."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), dtype=torch.float32, generator=g, device="cpu")


def sde_noise(x: torch.Tensor, sig: Sequence[float], settings: GenerateSettings, n_prompts: int):
    """SDE noise keyed per prompt: each prompt's `batch` images get the noise ComfyUI's
    KSampler would give that prompt alone (one Brownian tree over its batch, entropy = seed),
    so an image does not depend on the other prompts sampled with it."""
    blocks = x.chunk(n_prompts, dim=0)
    if settings.noise == "brownian":
        return keyed_noise_sampler([brownian_noise_sampler(b, sig, settings.seed) for b in blocks])
    return keyed_noise_sampler(
        [
            iid_noise_sampler(b, torch.Generator(x.device).manual_seed(settings.seed ^ SDE_SEED_KEY))
            for b in blocks
        ]
    )


def _folder(path: str | None) -> Path | None:
    return None if path is None else Path(path)


def check_device(name: str | None) -> None:
    """Refuse a device this machine does not have, before anything is loaded."""
    from bigasp.devices import resolve

    resolve(name, setting="--device")


def to_pil(pixels: torch.Tensor) -> list:
    """[-1, 1] images -> PIL, exactly ComfyUI's VAEDecode + SaveImage rounding (truncation)."""
    from PIL import Image

    x = torch.clamp((pixels.float() + 1.0) / 2.0, 0.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.clip(255.0 * im, 0, 255).astype(np.uint8)) for im in x]


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move in place; cast only when needed (diffusers warns on every dtype cast). A module
    that already computes in `dtype` from narrower stored weights (`cast_at_use`) keeps them."""
    from bigasp.models.cast_at_use import compute_dtype, drop_cast_at_use

    p = next(module.parameters())
    if p.device != device:
        module.to(device=device)
    if compute_dtype(module) != dtype:
        drop_cast_at_use(module)
        module.to(dtype=dtype)
    module.eval()


class Generator:
    """Holds an SDXL bundle on a device; `generate` many times with different settings.

    The bundle's modules are moved/cast in place (no copy: SDXL is 7 GB).
    """

    def __init__(
        self,
        model: SDXL,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        *,
        vae_dtype: torch.dtype = torch.float32,
        loras: Sequence[LoraSpec] = (),
    ) -> None:
        """`loras`: the LoRAs already merged into `model`, for the PNG metadata and workflow
        (`LoraSpec`s, or (file, weight) pairs for one weight on all three modules)."""
        self.loras = [x if isinstance(x, LoraSpec) else LoraSpec(Path(x[0]), float(x[1])) for x in loras]
        self._warned: set[str] = set()
        missing = [c for c in SDXL.COMPONENTS if getattr(model, c) is None]
        if missing:
            raise ConfigError(
                f"generation needs all SDXL components; {model.source or 'model'} lacks {missing}"
            )
        from bigasp.devices import resolve

        self.device = resolve(device, setting="--device")
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model, self.dtype, self.vae_dtype = model, dtype, vae_dtype
        for name in ("unet", "text_encoder", "text_encoder_2"):
            _place(getattr(model, name), self.device, dtype)
        _place(model.vae, self.device, vae_dtype)
        self.last_unet_calls = 0
        self._embeddings: EmbeddingLibrary | None = None

    # -- pieces (public so the watcher, demo and bench can time or reuse them) -----------

    def embeddings(self, settings: GenerateSettings) -> EmbeddingLibrary:
        """The embedding folder of `settings`, loaded once per folder."""
        if self._embeddings is None or self._embeddings.folder != _folder(settings.embeddings):
            self._embeddings = EmbeddingLibrary(settings.embeddings)
        return self._embeddings

    @torch.no_grad()
    def conditioning(self, prompts: Sequence[str], settings: GenerateSettings) -> Conditioning:
        """Text + micro-conditioning for `prompts`, each repeated `settings.batch` times."""
        from bigasp.models.conditioning import Crop, Size, sdxl_time_ids

        m = self.model
        text = encode_weighted(
            m.text_encoder,
            m.text_encoder_2,
            list(prompts),
            settings.syntax,
            settings.chunking,
            self.embeddings(settings),
        )
        size = Size(settings.height, settings.width)
        time_ids = sdxl_time_ids(original_size=size, crop=Crop(0, 0), target_size=size, device=self.device)
        b = settings.batch
        return Conditioning(
            embeds=text.embeds.repeat_interleave(b, dim=0),
            pooled=text.pooled.repeat_interleave(b, dim=0),
            time_ids=time_ids.repeat(len(prompts) * b, 1),
        )

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        settings: GenerateSettings,
        *,
        callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Sample latents (in the VAE's own scale, i.e. already divided by scaling_factor)."""
        settings.check()
        kind = resolve_kind(self.model.kind, settings)
        ms = model_sampling(kind.prediction, kind.shift)
        sig = schedule(ms, settings.scheduler, settings.steps).tolist()
        n = len(prompts) * settings.batch
        shape = (settings.batch, 4, settings.height // 8, settings.width // 8)
        noise = initial_noise(settings.seed, shape).repeat(len(prompts), 1, 1, 1).to(self.device)
        x = ms.noise_scaling(sig[0], noise, torch.zeros_like(noise), max_denoise(ms, sig[0]))

        cond = self.conditioning(prompts, settings)
        uncond = None
        if not math.isclose(settings.cfg, 1.0):  # cfg 1: the negative is never evaluated
            uncond = self.conditioning([settings.negative], settings.model_copy(update={"batch": n}))
        denoiser = GuidedDenoiser(
            self.model.unet, ms, cond, uncond, cfg=settings.cfg, pag=settings.pag, dtype=self.dtype
        )
        noise_sampler = None
        if settings.sampler in STOCHASTIC:
            noise_sampler = sde_noise(x, sig, settings, len(prompts))
        pag = perturbed_attention(self.model.unet, denoiser.state) if settings.pag > 0 else nullcontext()
        with pag, progress.bar(desc=f"sampling {n} image(s)", total=len(sig) - 1) as steps:

            def step_done(i: int, s: float, x_i: torch.Tensor, denoised: torch.Tensor) -> None:
                steps.update(1)
                if callback is not None:
                    callback(i, s, x_i, denoised)

            out = run_sampler(
                settings.sampler, denoiser, x, sig, ms=ms, noise_sampler=noise_sampler, callback=step_done
            )
        self.last_unet_calls = denoiser.unet_calls
        # inverse_noise_scaling at sigma 0 is the identity for both kinds.
        return out / self.model.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode to [-1, 1] pixels in the VAE's dtype (fp32 by default)."""
        vae = self.model.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latents.to(self.vae_dtype) + shift, return_dict=False)[0]

    def generate(self, prompts: Sequence[str] | str, settings: GenerateSettings | None = None) -> list:
        """PIL images, `settings.batch` per prompt, each carrying its PNG metadata in `.info`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        settings = settings or GenerateSettings.from_preset(preset_for(self.model.kind))
        kind = resolve_kind(self.model.kind, settings)
        # Prompts of different chunk counts are sampled separately: padding a short prompt
        # with empty chunks would change its image.
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            chunks = prompt_chunks(p, settings.syntax, settings.chunking, self.embeddings(settings))
            groups.setdefault(len(chunks), []).append(i)
        images: list = [None] * len(prompts)
        for idx in groups.values():
            latents = self.sample([prompts[i] for i in idx], settings)
            if not bool(torch.isfinite(latents).all()):
                raise BigaspError(
                    f"sampling produced NaN/inf values (cfg {settings.cfg}, pag {settings.pag}, "
                    f"dtype {self.dtype}); lower cfg/pag or prompt weights, or try --dtype fp32"
                )
            pixels = self.decode(latents)
            if not bool(torch.isfinite(pixels).all()):
                raise BigaspError(
                    f"the VAE decode produced NaN/inf pixels (VAE dtype {self.vae_dtype}); "
                    "decode in fp32 (--vae-dtype fp32, the default)"
                )
            batch_images = to_pil(pixels)
            for k, i in enumerate(idx):
                images[i] = batch_images[k * settings.batch : (k + 1) * settings.batch]
        out = []
        for p, ims in zip(prompts, images, strict=True):
            workflow = self.comfy_workflow(p, settings, kind)
            for j, im in enumerate(ims):
                im.info.update(
                    png_metadata(p, settings, kind, self.model.source, batch_index=j, loras=self.loras)
                )
                im.info.update(workflow)
                out.append(im)
        return out

    def comfy_workflow(self, prompt: str, settings: GenerateSettings, kind: ModelKind) -> dict[str, str]:
        """ComfyUI's `prompt` (API graph) and `workflow` (canvas graph) PNG chunks for this image.

        Where ComfyUI's plain nodes cannot make the same image (A1111 emphasis, bigasp's chunk
        split where it differs from ComfyUI's, i.i.d. SDE noise), no chunks and one warning: a
        wrong graph dragged in would sample silently differently."""
        from bigasp.models.comfyui import LoraNode, image_workflow

        why = ""
        if settings.sampler in STOCHASTIC and settings.noise != "brownian":
            why = "--noise iid (ComfyUI's SDE samplers use the Brownian tree)"
        elif settings.chunking != "comfy":
            lib = self.embeddings(settings)
            if any(
                prompt_chunks(t, settings.syntax, "comfy", lib)
                != prompt_chunks(t, settings.syntax, "bigasp", lib)
                for t in (prompt, settings.negative)
            ):
                why = "--chunking bigasp splits this prompt where ComfyUI would not"
        loras = [LoraNode(s.path.name, s.weight, s.clip) for s in self.loras]
        result = why or image_workflow(prompt, settings, kind, self.model.source, loras)
        if isinstance(result, str):
            if result not in self._warned:
                self._warned.add(result)
                log.warning(
                    "no ComfyUI workflow written into the PNG: %s; the PNG keeps its A1111 parameters "
                    "and bigasp settings",
                    result,
                )
            return {}
        graph, ui = result
        return {COMFY_API_KEY: json.dumps(graph), COMFY_UI_KEY: json.dumps(ui)}


# -- PNG metadata --------------------------------------------------------------------------

SAMPLER_NAMES = SAMPLER_DISPLAY
SCHEDULE_NAMES = SCHEDULER_DISPLAY
JSON_KEY = "bigasp"
COMFY_API_KEY = "prompt"  # ComfyUI's SaveImage: the API graph ...
COMFY_UI_KEY = "workflow"  # ... and the canvas graph, which the canvas loads on drop


def parameters_text(
    prompt: str,
    s: GenerateSettings,
    kind: ModelKind,
    source: str,
    batch_index: int,
    loras: Sequence[LoraSpec] = (),
) -> str:
    """A1111's `parameters` format: prompt, `Negative prompt:` line, `Key: value` line.

    A LoRA reads `NAME: WEIGHT`, or `NAME: W_MODEL:W_CLIP` when the text encoders' weight differs
    (the `--lora` spelling)."""
    fields = [
        ("Steps", s.steps),
        ("Sampler", SAMPLER_NAMES[s.sampler]),
        ("Schedule type", SCHEDULE_NAMES[s.scheduler]),
        ("CFG scale", s.cfg),
        ("Seed", s.seed),
        ("Size", f"{s.width}x{s.height}"),
        ("Model", Path(source).name if source else "unknown"),
    ]
    if s.batch > 1:
        fields += [("Batch size", s.batch), ("Batch pos", batch_index)]
    if s.pag > 0:
        fields.append(("PAG scale", s.pag))
    fields += [("Prediction", kind.prediction)]
    if kind.prediction == "flow":
        fields.append(("Shift", kind.shift))
    if loras:
        fields.append(("LoRA", '"' + ", ".join(_lora_label(x) for x in loras) + '"'))
    fields += [("Emphasis", s.syntax), ("Version", f"bigasp {_version()}")]
    line = ", ".join(f"{k}: {v}" for k, v in fields)
    return f"{prompt}\nNegative prompt: {s.negative}\n{line}"


def _lora_label(spec: LoraSpec) -> str:
    return f"{spec.path.stem}: {weights_label(spec.weight, spec.clip)}"


def png_metadata(
    prompt: str,
    s: GenerateSettings,
    kind: ModelKind,
    source: str,
    batch_index: int = 0,
    loras: Sequence[LoraSpec] = (),
) -> dict:
    model: dict[str, Any] = {"source": source, "kind": kind.to_json()}
    if loras:
        model["loras"] = lora_record(list(loras))
    payload = {
        "prompt": prompt,
        "settings": s.model_dump(mode="json"),
        "model": model,
        "batch_index": batch_index,
        "version": _version(),
    }
    return {
        "parameters": parameters_text(prompt, s, kind, source, batch_index, loras),
        JSON_KEY: json.dumps(payload, sort_keys=True),
    }


def _version() -> str:
    from bigasp import __version__

    return __version__


def save_png(image, path: str | Path) -> Path:
    """Write a PNG with its `parameters`, JSON and ComfyUI text chunks; atomic (temp + rename)."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key in ("parameters", JSON_KEY, COMFY_API_KEY, COMFY_UI_KEY):
        if key in image.info:
            info.add_text(key, image.info[key])
    with atomic_path(path, durable=False) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_metadata(path: str | Path) -> dict:
    """The JSON chunk of a PNG written by `save_png` (`prompt`, `settings`, `model`, ...)."""
    from PIL import Image

    with Image.open(path) as im:
        raw = im.text.get(JSON_KEY)
    if raw is None:
        raise ConfigError(f"{path} has no bigasp metadata chunk")
    return json.loads(raw)
