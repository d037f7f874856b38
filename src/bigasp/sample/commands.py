"""`bigasp generate` and `bigasp watch`."""

from __future__ import annotations

from pathlib import Path

import typer

PROGRESS_HELP = "Per-step progress bars on stderr (default: on a terminal only)."
PRESET_HELP = "Settings preset: auto (by model kind), bigasp-v2.5 (flow) or bigasp-v2 (eps)."
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_size(text: str) -> tuple[int, int]:
    """'832x1216' -> (width, height)."""
    from bigasp.errors import ConfigError

    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size {text!r} must look like WIDTHxHEIGHT, e.g. 832x1216") from None
    from bigasp.sample.generate import check_size

    check_size(w, h)
    return w, h


def parse_dtype(name: str | None):
    import torch

    from bigasp.errors import ConfigError

    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def _on_cuda(device: str | None) -> bool:
    from bigasp.devices import resolve

    return resolve(device, setting="--device").type == "cuda"


def load_for_generate(model: str, arch: str | None, dtypes: tuple, device: str | None, loras: list):
    """The SDXL bundle `generate` samples with, LoRAs merged.

    A single file's tensors stay as stored: a half-precision run uses them as they are, and an
    fp32 run from an fp16 file widens each layer's weights as the layer computes (exact, so the
    image is bitwise that of fp32 weights, in half the memory: 6.5 GiB of SDXL, not 12.9). With
    LoRAs the weights are loaded in fp32 and merged there, as before."""
    import torch

    from bigasp.models.cast_at_use import cast_at_use
    from bigasp.models.io import load_model
    from bigasp.sample.lora import apply_loras

    m = apply_loras(load_model(model, preset=arch, file_dtype_kept=not loras), loras)
    if not loras:
        run = dtypes[0] or (torch.float16 if _on_cuda(device) else torch.float32)
        for comp, module in m.modules().items():
            cast_at_use(module, dtypes[1] if comp == "vae" else run)
    return m


def build_settings(model_kind, preset: str, **flags):
    """Preset (auto = by model kind) + explicit flags -> validated GenerateSettings."""
    import logging

    from bigasp.config import validate
    from bigasp.sample.generate import PRESETS, GenerateSettings, preset_for

    name = preset_for(model_kind) if preset == "auto" else preset
    if name not in PRESETS:
        from bigasp.errors import ConfigError

        raise ConfigError(f"--preset {preset!r}: choose auto or one of {', '.join(PRESETS)}")
    size = flags.pop("size", None)
    if size is not None:
        flags["width"], flags["height"] = parse_size(size)
    data = {**PRESETS[name]["settings"], **{k: v for k, v in flags.items() if v is not None}}
    settings = validate(GenerateSettings, data, "command-line flags")
    expected = PRESETS[name]["prediction"]
    actual = settings.prediction or model_kind.prediction
    if expected != actual:
        logging.getLogger(__name__).warning(
            "preset %s is meant for a %s model but this model is %s; if it is bigASP v2.5 pass "
            "--prediction flow (single files carry no kind)",
            name,
            expected,
            actual,
        )
    if settings.shift is not None and actual == "eps":
        logging.getLogger(__name__).warning(
            "--shift %g is ignored: this is an eps model (the shift applies to flow models only)",
            settings.shift,
        )
    settings.check()
    return settings


def precheck(prompts: list[str], flags: dict, device: str | None) -> None:
    """Flags, prompts and device, validated before any model is loaded (a preset's values are
    valid by construction, so the explicit flags alone are what can be wrong)."""
    from bigasp.config import validate
    from bigasp.sample.generate import GenerateSettings, check_device
    from bigasp.sample.prompts import parse

    data = {k: v for k, v in flags.items() if v is not None and k != "size"}
    if flags.get("size") is not None:
        data["width"], data["height"] = parse_size(flags["size"])
    settings = validate(GenerateSettings, data, "command-line flags")
    check_device(device)
    if settings.embeddings is not None:
        from bigasp.sample.embeddings import EmbeddingLibrary

        EmbeddingLibrary(settings.embeddings)  # the folder exists
    for text in [*prompts, settings.negative]:
        parse(text, settings.syntax)


def check_out_dir(out: Path) -> None:
    """The output folder exists (or is created now) and is a folder, before any sampling."""
    from bigasp.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a folder; pass a folder for the PNGs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot create the output folder ({err.strerror})") from None


def unique_path(path: Path) -> Path:
    k = 1
    out = path
    while out.exists():
        out = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return out


def generate(
    prompts: list[str] = typer.Argument(..., help="Prompt(s); ComfyUI weight syntax by default."),
    model: str = typer.Option(..., "--model", "-m", help="Diffusers folder, single .safetensors or preset."),
    negative: str = typer.Option(None, help="Negative prompt (preset: 'low quality')."),
    preset: str = typer.Option("auto", help=PRESET_HELP),
    steps: int = typer.Option(None, help="Sampling steps."),
    cfg: float = typer.Option(None, help="CFG scale (1 = no negative pass)."),
    pag: float = typer.Option(None, help="PAG scale (0 = off)."),
    sampler: str = typer.Option(
        None,
        help="euler | dpmpp_2m | dpmpp_2m_sde | dpmpp_3m_sde (A1111 names like 'DPM++ 2M SDE' work too).",
    ),
    scheduler: str = typer.Option(
        None, help="normal | simple | sgm_uniform | beta | karras | exponential (any case, 'SGM Uniform')."
    ),
    shift: float = typer.Option(None, help="Flow shift (ComfyUI ModelSamplingSD3); default from the model."),
    prediction: str = typer.Option(None, help="Override model kind: eps or flow."),
    size: str = typer.Option(None, help="WIDTHxHEIGHT, multiples of 8 (64 recommended); default 832x1216."),
    seed: int = typer.Option(None, help="Noise seed (default 0)."),
    batch: int = typer.Option(None, help="Images per prompt."),
    syntax: str = typer.Option(None, help="Prompt weight syntax: comfy | a1111 | none."),
    chunking: str = typer.Option(
        None, help="Chunk boundaries: comfy (default, as ComfyUI) | bigasp (training)."
    ),
    embeddings: str = typer.Option(None, help="Folder of textual-inversion .safetensors for embedding:NAME."),
    noise: str = typer.Option(None, help="SDE noise: brownian (ComfyUI, default) | iid."),
    out: Path = typer.Option(Path("outputs"), help="Output folder for PNGs."),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda if available)."),
    dtype: str = typer.Option(
        None, help="UNet/text encoder precision: fp32 | fp16 | bf16 (default fp16 on GPU)."
    ),
    vae_dtype: str = typer.Option("fp32", help="VAE decode precision (fp32 avoids SDXL VAE NaNs)."),
    arch: str = typer.Option(None, help="Architecture preset of a single file, if it cannot be inferred."),
    show_progress: bool = typer.Option(None, "--progress/--no-progress", help=PROGRESS_HELP),
    threads: int = typer.Option(None, min=1, help="CPU intra-op threads (default: chosen for the machine)."),
    lora: list[str] = typer.Option(
        None,
        "--lora",
        help="FILE[:WEIGHT[:CLIP_WEIGHT]] SDXL LoRA (kohya or diffusers .safetensors), merged at WEIGHT "
        "(default 1) into the UNet and at CLIP_WEIGHT (default WEIGHT) into the text encoders, as "
        "ComfyUI's LoraLoader strength_model/strength_clip; repeatable.",
    ),
) -> None:
    """Generate images from text, sampled exactly as ComfyUI would."""
    from bigasp import progress
    from bigasp import threads as thread_defaults

    progress.configure(show_progress)
    from bigasp.sample.generate import Generator, save_png

    flags = dict(
        negative=negative, steps=steps, cfg=cfg, pag=pag, sampler=sampler, scheduler=scheduler,
        shift=shift, prediction=prediction, size=size, seed=seed, batch=batch, syntax=syntax,
        chunking=chunking, noise=noise, embeddings=embeddings,
    )  # fmt: skip
    # Everything that can be checked is checked before loading a 7 GB model.
    precheck(prompts, flags, device)
    dtypes = parse_dtype(dtype), parse_dtype(vae_dtype)
    check_out_dir(out)
    from bigasp.sample.lora import parse_lora

    loras = [parse_lora(text) for text in lora or []]
    thread_defaults.apply(device, model, threads=threads)
    m = load_for_generate(model, arch, dtypes, device, loras)
    settings = build_settings(m.kind, preset, **flags)
    gen = Generator(m, device, dtypes[0], vae_dtype=dtypes[1], loras=loras)
    images = gen.generate(prompts, settings)
    for k, im in enumerate(images):
        p, j = divmod(k, settings.batch)
        path = save_png(im, unique_path(out / f"{settings.seed}-{p:02d}-{j:02d}.png"))
        typer.echo(str(path))


def watch(
    run_dir: Path = typer.Argument(..., help="Run dir (with checkpoints/) or a checkpoints dir."),
    prompts: Path = typer.Option(..., "--prompts", help="Text file, one prompt per line ('#' comments)."),
    seeds: str = typer.Option("0", help="Comma-separated seeds; every prompt is sampled with each."),
    every: int = typer.Option(
        1, help="Sample every N-th complete checkpoint (counted from the last sampled)."
    ),
    every_samples: int = typer.Option(
        0, help="Sample a checkpoint only if none sampled within this many training samples before it."
    ),
    interval: float = typer.Option(60.0, help="Seconds between polls."),
    once: bool = typer.Option(False, "--once", help="Process what is there now and exit (tests, cron)."),
    ema: bool = typer.Option(
        False,
        "--ema",
        help="Sample each checkpoint's EMA weights (CKPT/ema; gallery in RUN_DIR/samples-ema).",
    ),
    out: Path = typer.Option(None, help="Samples folder (default RUN_DIR/samples)."),
    base: str = typer.Option(None, help="Model supplying components a checkpoint lacks (e.g. the VAE)."),
    preset: str = typer.Option("auto", help=PRESET_HELP),
    negative: str = typer.Option(None, help="Negative prompt."),
    steps: int = typer.Option(None, help="Sampling steps."),
    cfg: float = typer.Option(None, help="CFG scale."),
    pag: float = typer.Option(None, help="PAG scale."),
    sampler: str = typer.Option(None, help="Sampler name."),
    scheduler: str = typer.Option(None, help="Scheduler name."),
    shift: float = typer.Option(None, help="Flow shift."),
    prediction: str = typer.Option(None, help="Override model kind: eps or flow."),
    size: str = typer.Option(None, help="WIDTHxHEIGHT."),
    device: str = typer.Option(None, help="cuda | cpu."),
    dtype: str = typer.Option(None, help="fp32 | fp16 | bf16."),
    show_progress: bool = typer.Option(None, "--progress/--no-progress", help=PROGRESS_HELP),
    lora: list[str] = typer.Option(
        None,
        "--lora",
        help="FILE[:WEIGHT[:CLIP_WEIGHT]] SDXL LoRA merged into every checkpoint sampled (as generate "
        "--lora); repeatable.",
    ),
) -> None:
    """Sample new complete checkpoints of a training run into a side-by-side HTML gallery."""
    from bigasp import progress

    progress.configure(show_progress)
    from bigasp.errors import ConfigError
    from bigasp.sample.generate import check_device
    from bigasp.sample.lora import parse_lora
    from bigasp.sample.prompts import parse
    from bigasp.sample.watch import Watcher, read_prompts

    check_device(device)
    loras = [parse_lora(text) for text in lora or []]  # a bad path stops here, before any sampling
    prompt_list = read_prompts(prompts)
    for text in prompt_list:
        parse(text)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r} must be comma-separated integers, e.g. 0,1,2") from None
    flags = dict(
        negative=negative, steps=steps, cfg=cfg, pag=pag, sampler=sampler, scheduler=scheduler,
        shift=shift, prediction=prediction, size=size,
    )  # fmt: skip
    watcher = Watcher(
        run_dir,
        prompt_list,
        seed_list,
        out_dir=out,
        every=every,
        every_samples=every_samples,
        base=base,
        device=device,
        dtype=parse_dtype(dtype),
        settings_for=lambda model: build_settings(model.kind, preset, **flags),
        ema=ema,
        loras=loras,
    )
    watcher.warn_if_mixed()
    if once:
        for path in watcher.run_once():
            typer.echo(str(path))
    else:
        watcher.run(interval)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("watch")(watch)
