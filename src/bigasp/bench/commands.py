"""`bigasp bench ...`: throughput benchmarks. Each prints one pasteable table row; `--json` writes all fields.

Defaults are the tiny preset on CPU so every bench runs anywhere in seconds; pass
`--preset sdxl-base --device cuda` (and SDXL sizes) for the real numbers.
"""

from __future__ import annotations

from typing import Any

import typer

from bigasp.bench.common import H100_BF16_PEAK_TFLOPS

bench_app = typer.Typer(
    help="Throughput benchmarks (train step, VAE encode, sampling, data loading, tokenizer, ingest, planning).",
    no_args_is_help=True,
)

JSON_HELP = "Write the full result as JSON to this path ('-' prints it)."
DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda when present)."
PEAK_HELP = "Peak TFLOP/s for MFU (default: H100 dense bf16, 989.4). MFU is n/a on CPU."


def _finish(result, json_out: str | None) -> None:
    from bigasp.bench.common import emit

    emit(result, json_out, echo=typer.echo)


def _command(name: str, params: dict[str, Any]) -> str:
    from bigasp.bench.common import command_line

    return command_line(name, params)


@bench_app.command("train")
def train(
    preset: str = typer.Option("tiny", help="Model preset (tiny, sdxl-base)."),
    res: str = typer.Option("64x64", help="Image resolution HEIGHTxWIDTH in pixels (latent = /8)."),
    device_batch: int = typer.Option(4, help="Images per device per step."),
    precision: str = typer.Option("bf16", help="bf16 | fp16 (autocast over fp32 master weights) | fp32."),
    tokens: int = typer.Option(231, help="Prompt length: 77, 154 or 231 tokens (1–3 chunks)."),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile the UNet (graphs and recompiles counted)."
    ),
    compile_scope: str = typer.Option(
        "blocks", help="blocks: each resnet/transformer block; whole: the UNet."
    ),
    checkpointing: bool = typer.Option(False, "--checkpointing", help="Gradient checkpointing (UNet, TE1)."),
    fsdp: bool = typer.Option(False, "--fsdp", help="FSDP2 per UNet block, bf16 params / fp32 reduce."),
    train_te1: bool = typer.Option(
        True, "--train-te1/--frozen-te1", help="Train text encoder 1 (bigASP did)."
    ),
    channels_last: bool = typer.Option(
        True, "--channels-last/--no-channels-last", help="Channels-last UNet."
    ),
    warmup: int = typer.Option(2, help="Untimed steps before timing."),
    iters: int = typer.Option(5, help="Timed steps (median reported)."),
    seed: int = typer.Option(0, help="Seed for weights and synthetic data."),
    peak_tflops: float = typer.Option(H100_BF16_PEAK_TFLOPS, help=PEAK_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: str = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """One real training step (UNet + TE1, AdamW) on synthetic data: img/s, ms/step, TFLOP/s, MFU, memory."""
    params = dict(locals())  # first: only the command options
    from bigasp.bench.common import parse_res, resolve_device
    from bigasp.bench.train import TrainBenchConfig, run_train_bench

    h, w = parse_res(res)
    dev = resolve_device(device)
    cfg = TrainBenchConfig(
        preset=preset,
        height=h,
        width=w,
        device_batch=device_batch,
        precision=precision,
        tokens=tokens,
        compile=compile,
        compile_scope=compile_scope,
        checkpointing=checkpointing,
        fsdp=fsdp,
        train_te1=train_te1,
        channels_last=channels_last,
        warmup=warmup,
        iters=iters,
        seed=seed,
        peak_tflops=peak_tflops,
        device=str(dev),
    )
    params["device"] = str(dev)
    _finish(run_train_bench(cfg, dev, _command("train", params)), json_out)


@bench_app.command("encode")
def encode(
    preset: str = typer.Option("tiny", help="Model preset (tiny, sdxl-base)."),
    res: str = typer.Option("256x256", help="Image resolution HEIGHTxWIDTH."),
    batch: int = typer.Option(2, help="Images per encode call."),
    precision: str = typer.Option("fp32", help="fp32 | bf16 | fp16 (whole VAE in that dtype)."),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last"),
    warmup: int = typer.Option(1, help="Untimed batches."),
    iters: int = typer.Option(3, help="Timed batches (median reported)."),
    seed: int = typer.Option(0),
    peak_tflops: float = typer.Option(H100_BF16_PEAK_TFLOPS, help=PEAK_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: str = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """VAE encoder images/s at one resolution."""
    params = dict(locals())  # first: only the command options
    from bigasp.bench.common import parse_res, resolve_device
    from bigasp.bench.encode import run_encode_bench

    h, w = parse_res(res)
    dev = resolve_device(device)
    params["device"] = str(dev)
    result = run_encode_bench(
        preset=preset,
        height=h,
        width=w,
        batch=batch,
        precision=precision,
        channels_last=channels_last,
        warmup=warmup,
        iters=iters,
        seed=seed,
        peak_tflops=peak_tflops,
        device=dev,
        command=_command("encode", params),
    )
    _finish(result, json_out)


@bench_app.command("tokenize")
def tokenize(
    prompts: int = typer.Option(10_000, help="Number of realistic 40–200-token prompts."),
    batch: int = typer.Option(64, help="Prompts per tokenize+chunk call (a loader batch)."),
    repeats: int = typer.Option(3, help="Passes over all prompts (median reported)."),
    seed: int = typer.Option(0),
    json_out: str = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """CLIP tokenisation + 75-token chunking: ms per 1000 prompts."""
    params = dict(locals())  # first: only the command options
    from bigasp.bench.tokenize import run_tokenize_bench

    result = run_tokenize_bench(
        n_prompts=prompts, batch=batch, seed=seed, repeats=repeats, command=_command("tokenize", params)
    )
    _finish(result, json_out)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
