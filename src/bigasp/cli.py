"""The `bigasp` command: one subcommand per pipeline stage.

Each stage registers its commands from its own package (`bigasp.<stage>.commands`), so
this file only assembles them. Command modules import torch and models lazily inside the
command functions, which keeps `bigasp --help` fast.
"""

from __future__ import annotations

import logging
import sys

import typer

from bigasp import __version__
from bigasp.errors import BigaspError

app = typer.Typer(
    name="bigasp",
    help=(
        "Train bigASP-style SDXL finetunes and generate images from them.\n\n"
        "Pipeline: ingest -> annotate -> encode -> train -> generate / watch. Start with `bigasp demo`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bigasp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print version."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _register() -> None:
    from bigasp.models import commands as model_commands

    model_commands.register(app)
    from bigasp.sample import commands as sample_commands

    sample_commands.register(app)
    from bigasp.store import commands as store_commands

    store_commands.register(app)
    from bigasp.prep import commands as prep_commands

    prep_commands.register(app)
    from bigasp.train import data_commands

    data_commands.register(app)
    from bigasp.train import commands as train_commands

    train_commands.register(app)
    from bigasp.bench import commands as bench_commands

    bench_commands.register(app)
    from bigasp.demo import commands as demo_commands

    demo_commands.register(app)
    from bigasp.annotate import commands as annotate_commands

    annotate_commands.register(app)
    from bigasp.quality import commands as quality_commands

    quality_commands.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one clear message and exit 2, no traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except BigaspError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except Exception as err:  # click usage errors carry their own formatting
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
