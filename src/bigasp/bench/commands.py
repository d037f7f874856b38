"""`bigasp bench ...`: throughput benchmarks. Each prints one pasteable table row; `--json` writes all fields.

Defaults are the tiny preset on CPU so every bench runs anywhere in seconds; pass
`--arch sdxl-base --device cuda` (and SDXL sizes) for the real numbers.
"""

from __future__ import annotations

from typing import Any

import typer

from bigasp.bench import H100_BF16_PEAK_TFLOPS

bench_app = typer.Typer(
    help="Throughput benchmarks (train step, VAE encode, sampling, data loading, tokenizer, ingest, planning, report).",
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
    arch: str = typer.Option(
        "tiny", "--arch", "--preset", help="Architecture preset (tiny, sdxl-base); --preset: old spelling."
    ),
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
    prediction: str = typer.Option("eps", help="Objective: eps (bigASP v2) or flow (v2.5)."),
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
        preset=arch,
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
        prediction=prediction,
        peak_tflops=peak_tflops,
        device=str(dev),
    )
    params["device"] = str(dev)
    _finish(run_train_bench(cfg, dev, _command("train", params)), json_out)


@bench_app.command("memory")
def memory(
    arch: str = typer.Option(
        None,
        "--arch",
        help="Architecture preset (tiny, sdxl-base); default: the config's model.source, else tiny.",
    ),
    res: str = typer.Option("64x64", help="Image resolution HEIGHTxWIDTH in pixels (latent = /8)."),
    batch: int = typer.Option(1, help="Images per device per step."),
    tokens: int = typer.Option(231, help="Prompt length: 77, 154 or 231 tokens (1-3 chunks)."),
    recipe: str = typer.Option(
        None,
        help="Named settings on top of the config: cluster (fp32 master + AdamW, UNet + TE1), lora, lean.",
    ),
    config: str = typer.Option(
        None, "--config", help="A `bigasp train` TOML whose [model]/[train] settings the step uses."
    ),
    set_: list[str] = typer.Option(
        None, "--set", help="KEY=VALUE config override, e.g. model.gradient_checkpointing=true; repeatable."
    ),
    checkpointing: bool = typer.Option(
        None, "--checkpointing/--no-checkpointing", help="model.gradient_checkpointing."
    ),
    precision: str = typer.Option(
        None, help="train.precision: bf16 | fp16 (autocast over fp32 master) | fp32."
    ),
    device: str = typer.Option("cuda", help="The device the estimate is for: cuda (default) or cpu."),
    measure: bool = typer.Option(
        False, "--measure", help="Also run the step for real on --device and report the error."
    ),
    seed: int = typer.Option(0, help="Seed for weights and synthetic data."),
    json_out: str = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Peak memory of one training step (forward, backward, optimizer step) split into weights /
    gradients / optimizer state / activations, estimated on CPU with fake tensors (no allocation)."""
    params = dict(locals())
    import shlex

    from bigasp.bench.common import parse_res
    from bigasp.bench.memory import MemoryBenchConfig, run_memory_bench

    h, w = parse_res(res)
    overrides = list(set_ or [])
    if checkpointing is not None:
        overrides.append(f"model.gradient_checkpointing={str(checkpointing).lower()}")
    if precision is not None:
        overrides.append(f"train.precision={precision}")
    params.pop("set_")
    params["checkpointing"] = None
    command = _command("memory", params)
    command += "".join(f" --set {shlex.quote(o)}" for o in overrides)
    cfg = MemoryBenchConfig(
        arch=arch, height=h, width=w, batch=batch, tokens=tokens, recipe=recipe, config=config,
        overrides=overrides, target=device, measure=measure, seed=seed,
    )  # fmt: skip
    _finish(run_memory_bench(cfg, command), json_out)


@bench_app.command("encode")
def encode(
    arch: str = typer.Option(
        "tiny", "--arch", "--preset", help="Architecture preset (tiny, sdxl-base); --preset: old spelling."
    ),
    res: str = typer.Option("256x256", help="Image resolution HEIGHTxWIDTH."),
    batch: int = typer.Option(2, help="Images per encode call."),
    precision: str = typer.Option("fp32", help="fp32 | bf16 | fp16 (whole VAE in that dtype)."),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last"),
    warmup: int = typer.Option(1, help="Untimed batches."),
    iters: int = typer.Option(3, help="Timed batches (median reported)."),
    seed: int = typer.Option(0),
    peak_tflops: float = typer.Option(H100_BF16_PEAK_TFLOPS, help=PEAK_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    url: str = typer.Option(
        None,
        help="Object-storage URL: ingest img2dataset-style shards there, then time `encode` reading the photos.",
    ),
    local_s3: bool = typer.Option(
        False, "--local-s3", help="Serve --url from a local S3 server (moto) in this process."
    ),
    latency_ms: float = typer.Option(0.0, help="With --local-s3: delay added to every request."),
    shards: int = typer.Option(2, help="With --url: tar shards."),
    per_shard: int = typer.Option(100, help="With --url: images per shard."),
    workers: int = typer.Option(4, help="With --url: DataLoader workers reading photos ahead."),
    json_out: str = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """VAE encoder images/s at one resolution; with --url, the encode stage reading photos from a bucket."""
    params = dict(locals())  # first: only the command options
    if url or local_s3:
        _url_bench("encode", params, url, local_s3, latency_ms, shards, per_shard, workers, seed, json_out)
        return
    from bigasp.bench.common import parse_res, resolve_device
    from bigasp.bench.encode import run_encode_bench

    h, w = parse_res(res)
    dev = resolve_device(device)
    params["device"] = str(dev)
    result = run_encode_bench(
        preset=arch,
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


@bench_app.command("sample")
def sample(
    arch: str = typer.Option(
        "tiny", "--arch", "--preset", help="Architecture preset (tiny, sdxl-base); --preset: old spelling."
    ),
    res: str = typer.Option("64x64", help="Image resolution HEIGHTxWIDTH."),
    precision: str = typer.Option("auto", help="auto (fp16 on CUDA, fp32 on CPU) | fp16 | bf16 | fp32."),
    batches: str = typer.Option("1,4", help="Comma-separated batch sizes."),
    steps: str = typer.Option("2,6", help="Two step counts n1,n2: it/s = (n2-n1)/(t2-t1)."),
    repeats: int = typer.Option(3, help="Timed (n1, n2) pairs per setting (median reported)."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="Also time diffusers' pipelines."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: str = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Sampling it/s (euler, CFG and CFG+PAG) for bigasp's Generator vs diffusers' SDXL pipeline."""
    params = dict(locals())  # first: only the command options
    from bigasp.bench.common import parse_res, resolve_device
    from bigasp.bench.sample import run_sample_bench
    from bigasp.errors import ConfigError

    h, w = parse_res(res)
    dev = resolve_device(device)
    if precision == "auto":
        precision = "fp16" if dev.type == "cuda" else "fp32"
    try:
        batch_list = [int(b) for b in batches.split(",")]
        n1, n2 = (int(n) for n in steps.split(","))
    except ValueError:
        raise ConfigError("--batches must be like 1,4 and --steps like 2,6 (two step counts)") from None
    if not 1 <= n1 < n2:
        raise ConfigError(f"--steps {steps}: need 1 <= n1 < n2")
    params.update(device=str(dev), precision=precision)
    result = run_sample_bench(
        preset=arch,
        height=h,
        width=w,
        precision=precision,
        batches=batch_list,
        steps=(n1, n2),
        repeats=repeats,
        baseline=baseline,
        seed=seed,
        device=dev,
        command=_command("sample", params),
    )
    _finish(result, json_out)


@bench_app.command("load")
def load(
    latent: str = typer.Option("128x128", help="Latent HEIGHTxWIDTH (SDXL 1024²: 128x128)."),
    images: int = typer.Option(512, help="Images written to the temporary latent store."),
    batch: int = typer.Option(16, help="Device batch size."),
    workers: int = typer.Option(0, help="DataLoader workers (0 = this process: the per-core figure)."),
    batches: int = typer.Option(20, help="Timed batches."),
    warmup: int = typer.Option(2, help="Untimed batches first."),
    seed: int = typer.Option(0),
    url: str = typer.Option(
        None,
        help="Object-storage URL (s3://bucket/prefix) to upload the store to and read it from (cold, warm).",
    ),
    local_s3: bool = typer.Option(
        False,
        "--local-s3",
        help="Serve --url from a local S3 server (moto, a dev dependency) in this process.",
    ),
    latency_ms: float = typer.Option(0.0, help="With --local-s3: delay added to every request."),
    prefetch: int = typer.Option(64, help="With --url: batches fetched ahead (data.prefetch_batches)."),
    concurrency: int = typer.Option(32, help="With --url: ranged reads in flight (data.read_concurrency)."),
    json_out: str = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Training data loader samples/s per worker, from a real latent store in a temp dir (or a bucket)."""
    params = dict(locals())  # first: only the command options
    import contextlib

    from bigasp.bench.load import run_load_bench
    from bigasp.errors import ConfigError

    try:
        lh, lw = (int(v) for v in latent.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--latent must look like 128x128, got {latent!r}") from None
    if local_s3 and not url:
        raise ConfigError("--local-s3 serves --url: pass e.g. --url s3://bench")
    with contextlib.ExitStack() as stack:
        opts: dict = {}
        if local_s3:
            import os

            from bigasp.bench.s3server import local_s3 as serve

            endpoint = stack.enter_context(serve(latency_ms))
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                os.environ.setdefault(k, "bench")
            opts = {"endpoint_url": endpoint, "use_listings_cache": False}
            import fsspec

            fsspec.filesystem("s3", **opts).mkdir(url.removeprefix("s3://").split("/", 1)[0])
        result = run_load_bench(
            latent=(lh, lw),
            images=images,
            batch=batch,
            workers=workers,
            batches=batches,
            warmup=warmup,
            seed=seed,
            command=_command("load", params),
            url=url,
            storage_options=opts,
            prefetch=prefetch,
            concurrency=concurrency,
        )
    _finish(result, json_out)


@bench_app.command("plan")
def plan(
    rows: int = typer.Option(13_000_000, help="Manifest rows (bigASP v2: ~13M)."),
    device_batch: int = typer.Option(16, help="Device batch size."),
    world_size: int = typer.Option(32, help="Ranks (rank 0's batch list is built)."),
    seed: int = typer.Option(0),
    json_out: str = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Buckets + one epoch's batch order for an N-row synthetic manifest: time and peak RSS."""
    params = dict(locals())  # first: only the command options
    from bigasp.bench.plan import run_plan_bench

    result = run_plan_bench(
        rows=rows,
        device_batch=device_batch,
        world_size=world_size,
        seed=seed,
        command=_command("plan", params),
    )
    _finish(result, json_out)


@bench_app.command("stream")
def stream(
    images: int = typer.Option(1_000_000, help="Images in the synthetic manifest."),
    files: int = typer.Option(250, help="Index files (= waves: one shard published per wave)."),
    device_batch: int = typer.Option(16, help="Device batch size."),
    seed: int = typer.Option(0),
    json_out: str = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Streaming first pass bookkeeping: ms per wave (first vs last waves) and the replay on resume."""
    params = dict(locals())  # first: only the command options
    from bigasp.bench.stream import run_stream_bench

    result = run_stream_bench(
        images=images, files=files, device_batch=device_batch, seed=seed, command=_command("stream", params)
    )
    _finish(result, json_out)


@bench_app.command("ingest")
def ingest(
    images: int = typer.Option(2000, help="Small JPEGs generated and scanned."),
    seed: int = typer.Option(0),
    url: str = typer.Option(
        None,
        help="Object-storage URL (s3://bucket/prefix): upload img2dataset-style tar shards there and ingest them.",
    ),
    local_s3: bool = typer.Option(
        False, "--local-s3", help="Serve --url from a local S3 server (moto) in this process."
    ),
    latency_ms: float = typer.Option(0.0, help="With --local-s3: delay added to every request."),
    shards: int = typer.Option(4, help="With --url: tar shards."),
    per_shard: int = typer.Option(250, help="With --url: images per shard (each with .txt and .json)."),
    json_out: str = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Ingest images/s: header scan of generated small JPEGs (target ≥ 500/s on one core), or with --url
    tar shards in a bucket, with and without read-ahead, and the bytes fetched per image."""
    params = dict(locals())  # first: only the command options
    if url or local_s3:
        _url_bench("ingest", params, url, local_s3, latency_ms, shards, per_shard, 0, seed, json_out)
        return
    from bigasp.bench.ingest import run_ingest_bench

    _finish(run_ingest_bench(images=images, seed=seed, command=_command("ingest", params)), json_out)


def _url_bench(stage, params, url, local_s3, latency_ms, shards, per_shard, workers, seed, json_out) -> None:
    import contextlib
    import os

    from bigasp.bench.urls import run_url_bench
    from bigasp.errors import ConfigError

    if not url:
        raise ConfigError("--local-s3 serves --url: pass e.g. --url s3://bench/photos")
    with contextlib.ExitStack() as stack:
        opts: dict = {}
        if local_s3:
            import fsspec

            from bigasp.bench.s3server import local_s3 as serve

            endpoint = stack.enter_context(serve(latency_ms))
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                os.environ.setdefault(k, "bench")
            opts = {"endpoint_url": endpoint, "use_listings_cache": False}
            fsspec.filesystem("s3", **opts).makedirs(
                url.removeprefix("s3://").split("/", 1)[0], exist_ok=True
            )  # moto keeps buckets per process
        result = run_url_bench(
            stage=stage, url=url, storage_options=opts, shards=shards, per_shard=per_shard, workers=workers,
            seed=seed, latency_ms=latency_ms, command=_command(stage, params),
        )  # fmt: skip
    _finish(result, json_out)


@bench_app.command("report")
def report(
    rows: int = typer.Option(13_000_000, help="Synthetic manifest rows (bigASP v2: ~13M)."),
    ngrams: bool = typer.Option(True, "--ngrams/--no-ngrams", help="Also time the caption n-gram pass."),
    keep: str = typer.Option(
        None, help="Generate the dataset here (reused on the next run) instead of a temp dir."
    ),
    seed: int = typer.Option(0),
    workers: int = typer.Option(
        1, "--workers", min=0, help="Caption-pass processes, as `dataset report --workers` (0: one per core)."
    ),
    json_out: str = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """`bigasp dataset report` on a synthetic manifest: columnar passes (s), n-gram captions/s, peak RSS."""
    params = dict(locals())  # first: only the command options
    from bigasp.bench.report import run_report_bench

    result = run_report_bench(
        rows=rows, seed=seed, ngrams=ngrams, keep=keep, workers=workers, command=_command("report", params)
    )
    _finish(result, json_out)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
