"""`bigasp bench encode`: VAE encoder images/s at one resolution, fp32 or bf16.

Times `vae.encode(x).latent_dist` on a synthetic batch of images in [-1, 1] — the same call
the encode stage makes, minus JPEG decode (measured separately by `bench ingest`). bf16 runs
the whole VAE in bf16 (weights cast), as a production encode would; fp32 keeps TF32 matmuls
enabled on CUDA, the fast path for the stock `force_upcast` SDXL VAE.
"""

from __future__ import annotations

import torch

from bigasp.bench.common import (
    BenchResult,
    PeakMemory,
    machine_info,
    precision_dtype,
    summarize,
    time_iterations,
)
from bigasp.flops import count_flops


def run_encode_bench(
    *,
    preset: str,
    height: int,
    width: int,
    batch: int,
    precision: str,
    channels_last: bool,
    warmup: int,
    iters: int,
    seed: int,
    peak_tflops: float,
    device: torch.device,
    command: str,
) -> BenchResult:
    from bigasp.models import build_preset

    dtype = precision_dtype(precision)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    vae = build_preset(preset, components=("vae",), seed=seed, device=device).vae.eval().to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        vae.to(memory_format=fmt)
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, 3, height, width, generator=g) * 2 - 1).to(device, dtype, memory_format=fmt)

    @torch.inference_mode()
    def encode() -> torch.Tensor:
        return vae.encode(x).latent_dist.mean

    flops, latents = count_flops(encode)
    with PeakMemory(device) as mem:
        seconds = time_iterations(encode, device, warmup=warmup, iters=iters)
    stats = summarize(seconds)
    step_s = stats["median_s"]
    achieved = flops.total / step_s / 1e12
    # Only bf16/fp16 have the tensor-core peak; fp32 (TF32) MFU is against half of it.
    peak = peak_tflops if dtype != torch.float32 else peak_tflops / 2
    metrics = {
        "img_per_s": batch / step_s,
        "ms_per_batch": step_s * 1000,
        "tflop_per_image": flops.total / batch / 1e12,
        "model_tflops": achieved,
        "mfu_pct": 100 * achieved / peak if device.type == "cuda" else None,
        "latent_shape": list(latents.shape[1:]),
        **{f"batch_{k}": v for k, v in stats.items()},
        **mem.result(),
    }
    mem_key = "peak_allocated_gib" if device.type == "cuda" else "peak_rss_gib"
    return BenchResult(
        bench="encode",
        config={
            "preset": preset,
            "height": height,
            "width": width,
            "batch": batch,
            "precision": precision,
            "channels_last": channels_last,
            "peak_tflops": peak_tflops,
        },
        metrics=metrics,
        headline=[
            ("img_per_s", "img/s"),
            ("ms_per_batch", "ms/batch"),
            ("mfu_pct", "% MFU"),
            (mem_key, "GiB peak"),
        ],
        command=command,
        machine=machine_info(device),
        notes=[] if device.type == "cuda" else ["MFU is n/a on CPU"],
    )
