"""`bigasp bench sample`: UNet iterations/s of bigasp's Generator vs diffusers' SDXL pipeline.

Both run in one process on the same modules, device and dtype, euler, same size and steps.
Iterations/s is taken from two runs of different step counts, `(n2 - n1) / (t2 - t1)`, which
cancels everything that is not a denoising step (text encoding, noise, pipeline setup) on
both sides alike; latents are returned without VAE decode. Settings: CFG, and CFG+PAG
(bigasp batches cond/uncond/perturbed into one UNet call), at batch 1 and 4.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bigasp.bench.common import BenchResult, PeakMemory, machine_info, precision_dtype, synchronize

PROMPT = "a photograph of a woman standing near a window, soft evening light, detailed, score_8_up"
NEGATIVE = "low quality"
CFG = 3.0
PAG = 2.0


def _diffusers_tokenizers():
    """Two CLIP tokenizers from the shipped files, sized for diffusers (77, TE2 pads with '!')."""
    from bigasp.text.tokenizer import hf_clip_tokenizer

    return hf_clip_tokenizer(), hf_clip_tokenizer(pad_token="!")


def _diffusers_pipelines(model, preset: str):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline

    from bigasp.models.presets import component_config

    sched_cfg = {k: v for k, v in component_config(preset, "scheduler").items() if not k.startswith("_")}
    tok, tok2 = _diffusers_tokenizers()
    parts = dict(
        vae=model.vae,
        text_encoder=model.text_encoder,
        text_encoder_2=model.text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=model.unet,
        scheduler=EulerDiscreteScheduler.from_config(sched_cfg),
    )
    pipe = StableDiffusionXLPipeline(**parts)
    pag = StableDiffusionXLPAGPipeline(**parts, pag_applied_layers=["mid"])
    for p in (pipe, pag):
        p.set_progress_bar_config(disable=True)
    return pipe, pag


def _its(run, n1: int, n2: int, device: torch.device, repeats: int) -> float:
    """Denoising steps per second from the time difference of an n2- and an n1-step run."""
    run(n1)  # warm-up (allocator, kernels, lazy init)
    best = []
    for _ in range(repeats):
        times = []
        for n in (n1, n2):
            synchronize(device)
            t0 = time.perf_counter()
            run(n)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        best.append((n2 - n1) / max(times[1] - times[0], 1e-9))
    best.sort()
    return best[len(best) // 2]


def run_sample_bench(
    *,
    preset: str,
    height: int,
    width: int,
    precision: str,
    batches: list[int],
    steps: tuple[int, int],
    repeats: int,
    baseline: bool,
    seed: int,
    device: torch.device,
    command: str,
) -> BenchResult:
    from bigasp.models import build_preset
    from bigasp.sample import GenerateSettings, Generator

    dtype = precision_dtype(precision)
    model = build_preset(preset, seed=seed, device=device)
    gen = Generator(
        model, device=device, dtype=dtype, vae_dtype=dtype if device.type == "cuda" else torch.float32
    )
    n1, n2 = steps
    metrics: dict[str, Any] = {}
    with PeakMemory(device) as mem:
        for b in batches:
            for mode, pag in (("cfg", 0.0), ("cfgpag", PAG)):

                def bigasp_run(n: int, b=b, pag=pag) -> None:
                    s = GenerateSettings(
                        negative=NEGATIVE,
                        steps=n,
                        cfg=CFG,
                        pag=pag,
                        sampler="euler",
                        scheduler="normal",
                        width=width,
                        height=height,
                        seed=seed,
                        batch=b,
                    )
                    gen.sample([PROMPT], s)

                metrics[f"bigasp_{mode}_b{b}_it_s"] = _its(bigasp_run, n1, n2, device, repeats)
        if baseline:
            pipe, pag_pipe = _diffusers_pipelines(model, preset)
            for b in batches:
                for mode, p, extra in (("cfg", pipe, {}), ("cfgpag", pag_pipe, {"pag_scale": PAG})):

                    def diffusers_run(n: int, b=b, p=p, extra=extra) -> None:
                        p(
                            prompt=PROMPT,
                            negative_prompt=NEGATIVE,
                            num_inference_steps=n,
                            guidance_scale=CFG,
                            height=height,
                            width=width,
                            num_images_per_prompt=b,
                            generator=torch.Generator(device).manual_seed(seed),
                            output_type="latent",
                            **extra,
                        )

                    metrics[f"diffusers_{mode}_b{b}_it_s"] = _its(diffusers_run, n1, n2, device, repeats)
    for b in batches:
        cfg, pag = metrics[f"bigasp_cfg_b{b}_it_s"], metrics[f"bigasp_cfgpag_b{b}_it_s"]
        metrics[f"pag_step_ratio_b{b}"] = cfg / pag  # CFG+PAG step time / CFG step time
        if baseline:
            metrics[f"vs_diffusers_cfg_b{b}"] = cfg / metrics[f"diffusers_cfg_b{b}_it_s"]
            metrics[f"vs_diffusers_cfgpag_b{b}"] = pag / metrics[f"diffusers_cfgpag_b{b}_it_s"]
    metrics.update(mem.result())
    b0 = batches[0]
    headline = [
        (f"bigasp_cfg_b{b0}_it_s", f"it/s CFG b{b0}"),
        (f"bigasp_cfgpag_b{b0}_it_s", f"it/s CFG+PAG b{b0}"),
    ]
    if baseline:
        headline += [
            (f"diffusers_cfg_b{b0}_it_s", "it/s diffusers CFG"),
            (f"vs_diffusers_cfg_b{b0}", "x diffusers"),
        ]
    headline.append((f"pag_step_ratio_b{b0}", "x CFG step (PAG)"))
    return BenchResult(
        bench="sample",
        config={
            "preset": preset,
            "height": height,
            "width": width,
            "precision": precision,
            "batches": batches,
            "steps": list(steps),
            "sampler": "euler",
            "scheduler": "normal",
            "cfg": CFG,
            "pag": PAG,
        },
        metrics=metrics,
        headline=headline,
        command=command,
        machine=machine_info(device),
    )
