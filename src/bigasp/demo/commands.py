"""`bigasp demo [--quick] [--out DIR] [--seed N]`."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    quick: bool = typer.Option(False, "--quick", help="About one minute: fewer photos, shorter training."),
    out: Path = typer.Option(
        Path("demo-out"), "--out", help="Output folder (re-running reuses finished stages)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds the photos, crops, training data order and sampling."),
) -> None:
    """Synthetic photos -> ingest -> encode -> train -> generate -> gallery, on CPU, in minutes."""
    from bigasp.demo.report import format_report
    from bigasp.demo.run import run_demo

    result = run_demo(out, quick=quick, seed=seed, echo=typer.echo)
    typer.echo(format_report(result))


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
