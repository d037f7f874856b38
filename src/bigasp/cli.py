"""The `bigasp` command: one subcommand per pipeline stage.

Each stage registers its commands from its own package (`bigasp.<stage>.commands`), so
this file only assembles them. Command modules import torch and models lazily inside the
command functions, which keeps `bigasp --help` fast.
"""

from __future__ import annotations

import logging
import os
import re
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


_debug = {"on": os.environ.get("BIGASP_DEBUG", "") not in ("", "0")}


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print version."),
    debug: bool = typer.Option(
        False, "--debug", help="Show the full traceback of an error (also BIGASP_DEBUG=1)."
    ),
) -> None:
    _debug["on"] = _debug["on"] or debug
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _dataset_group() -> typer.Typer:
    """`bigasp dataset ...`: commands of three layers in one group, assembled here so that no
    lower layer imports a higher one (store <- train <- report)."""
    from bigasp.report import commands as report_commands
    from bigasp.store import commands as store_commands
    from bigasp.train import data_commands, info_command

    group = typer.Typer(help="Inspect a dataset directory (manifest, rejects, latent shards).")
    info_command.register(group)
    store_commands.register(group)
    data_commands.register(group)
    report_commands.register(group)
    return group


def _register() -> None:
    from bigasp.models import commands as model_commands

    model_commands.register(app)
    from bigasp.sample import commands as sample_commands

    sample_commands.register(app)
    app.add_typer(_dataset_group(), name="dataset")
    from bigasp.prep import commands as prep_commands

    prep_commands.register(app)
    from bigasp.train import commands as train_commands

    train_commands.register(app)
    from bigasp.bench import commands as bench_commands

    bench_commands.register(app)
    from bigasp.demo import commands as demo_commands

    demo_commands.register(app)
    from bigasp.annotate import commands as annotate_commands

    annotate_commands.register(app)
    bench_commands.bench_app.command("annotate")(annotate_commands.bench_annotate_cmd)
    from bigasp.quality import commands as quality_commands

    quality_commands.register(app)


_register()


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """The exception classes typer raises for a mistyped command, flag or value.

    typer >= 0.24 vendors click as `typer._click`, whose exceptions derive from
    `typer.TyperException`; older typer raises real `click` exceptions. Both carry
    `format_message()` and `exit_code`.
    """
    found: list[type[BaseException]] = []
    if isinstance(getattr(typer, "TyperException", None), type):
        found.append(typer.TyperException)
    try:
        import click

        found.append(click.ClickException)
    except ImportError:  # pragma: no cover - typer without a click install
        pass
    return tuple(found)


def _abort_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [typer.Abort]
    try:
        import click

        found.append(click.exceptions.Abort)
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


def _exit_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [typer.Exit]
    try:
        import click

        found.append(click.exceptions.Exit)
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


def one_line(text: str) -> str:
    """A message on one line: user errors are one line; tracebacks are for bugs (`--debug`)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _raised_in_a_worker(err: BaseException) -> str:
    """The message of an error a DataLoader worker raised: torch re-raises it in the main process
    as the same class with "Caught X in DataLoader worker process N. Original Traceback ..." as
    its text; the user's line is the original message, the traceback's last entry."""
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    name = type(err).__name__
    found = list(re.finditer(rf"^(?:\w+\.)*{re.escape(name)}: ", text, re.M))
    return text[found[-1].end() :].strip() if found else text


def _fail(prefix: str, message: str, code: int, *, traceback_available: bool = True) -> None:
    if _debug["on"] and traceback_available:
        import traceback

        traceback.print_exc()
    typer.secho(f"{prefix}: {one_line(message)}", fg=typer.colors.RED, err=True)
    sys.exit(code)


def _usage_message(err: BaseException) -> str:
    ctx = getattr(err, "ctx", None)
    where = getattr(ctx, "command_path", None) if ctx is not None else None
    hint = f" (see `{where} --help`)" if where else ""
    return f"{err.format_message()}{hint}"  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Exit status: 0 done, 1 a command reported a failure (e.g. corrupt
    records), 2 a user error (one line, no traceback; `--debug` shows it), 130 interrupted."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except BigaspError as err:
        _fail(getattr(err, "label", "error"), _raised_in_a_worker(err), getattr(err, "exit_code", 2))
    except _exit_types() as e:
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, *_abort_types()):
        _fail("interrupted", "stopped by Ctrl-C; work committed so far is kept", 130)
    except _usage_error_types() as err:
        _fail("error", _usage_message(err), getattr(err, "exit_code", 2) or 2)
    except OSError as err:  # the machine, not the code: a full disk, a permission, a vanished file
        _fail("error", f"{err} ({type(err).__name__})", 1)
    # Without standalone mode typer returns (not raises) the status of `raise typer.Exit(n)`
    # and of Ctrl-C (130): it must become the process's exit status.
    if isinstance(rc, int) and not isinstance(rc, bool) and rc != 0:
        if rc == 130:
            _fail("interrupted", "stopped by Ctrl-C", 130, traceback_available=False)
        sys.exit(rc)


def run() -> None:
    """The `bigasp` executable: `main()`, then the interpreter's own exit steps (other threads
    joined, atexit handlers run, output flushed) and `os._exit`, skipping only the final teardown.

    In that teardown, native thread pools still alive (pyarrow's, reading a Python file object;
    gloo's) can abort a process whose work is done and whose exit status is already decided
    ("terminate called without an active exception", SIGABRT): a finished encode would report
    failure to torchrun or SLURM. `main()` stays a plain function for callers in Python.
    """
    code: int = 0
    try:
        main()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:  # sys.exit("message"): printed, status 1, as the interpreter does
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # a bug: the traceback, as the interpreter would print it
        sys.excepthook(*sys.exc_info())
        code = 1
    _leave(code)


def _leave(code: int) -> None:
    import atexit
    import contextlib
    import threading

    # The interpreter's own first exit steps, in its order: threading's exit hooks (they stop
    # concurrent.futures' executors, whose manager threads would otherwise wait forever), then
    # every non-daemon thread joined, then the atexit handlers (logging, multiprocessing, ...).
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to say
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
