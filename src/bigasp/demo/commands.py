"""`bigasp demo [--quick] [--out DIR] [--seed N]`."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    quick: bool = typer.Option(
        False, "--quick", help="A smoke run: fewer photos and ratings, a quarter of the training."
    ),
    out: Path = typer.Option(
        Path("demo-out"), "--out", help="Output folder (re-running reuses finished stages)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds the photos, crops, training data order and sampling."),
    stream: bool = typer.Option(
        False,
        "--stream",
        help="Start encode and train together: the encoder publishes small shards in the background and "
        "training streams its first pass from them, waiting when it runs ahead.",
    ),
    lora: bool = typer.Option(
        False,
        "--lora",
        help="Train a LoCon adapter on the frozen starting model (configs/demo-lora.toml) instead of the model, "
        "generate with --lora, and show what the adapter taught the untrained base.",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Use an --out folder that is not empty and was not made by the demo (its photos/, run/, "
        "base-model/, dataset/ and grid/ are replaced).",
    ),
) -> None:
    """Synthetic photos -> ingest -> quality scores -> encode -> train -> generate -> gallery, on CPU, in minutes."""
    import torch

    from bigasp.demo.report import format_report
    from bigasp.demo.run import run_demo

    # The demo's tensors are tiny: intra-op threads cost more in synchronisation than they save, and on
    # a shared 2-core box they stall behind other processes (measured: 14 vs 35-90 samples/s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_demo(out, quick=quick, seed=seed, echo=typer.echo, force=force, stream=stream,
                          lora=lora)  # fmt: skip
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests) keep their setting
    typer.echo(format_report(result))


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
