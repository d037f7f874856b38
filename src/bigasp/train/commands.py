"""`bigasp train CONFIG.toml [--resume auto|PATH] [--set key=value ...] [key=value ...]`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command(
        "train",
        context_settings={"allow_extra_args": False},
        help=(
            "Train (or resume) an SDXL finetune from a TOML run config. Overrides use dotted keys, "
            "as `--set train.lr=2e-4` (like the other commands) or positionally, e.g. "
            "`train.lr=2e-4 data.device_batch_size=8`. Multi-GPU: launch with torchrun "
            "(see docs/training.md)."
        ),
    )
    def train_cmd(
        config: str = typer.Argument(..., help="Run config TOML (see configs/ and docs/training.md)."),
        overrides: list[str] = typer.Argument(None, help="key.path=value overrides, parsed as TOML values."),
        set_: list[str] = typer.Option(
            None,
            "--set",
            help="key.path=value override (repeatable), parsed as a TOML value; applied before the "
            "positional ones.",
        ),
        resume: str = typer.Option(
            None,
            "--resume",
            help="'auto' = newest complete checkpoint in run_dir (fresh if none), or a path.",
        ),
        stop_at: int = typer.Option(
            None, "--stop-at", help="Checkpoint and exit after this many samples (a slice of the schedule)."
        ),
        overwrite: bool = typer.Option(
            False,
            "--overwrite",
            help="Start a fresh run even though run_dir holds checkpoints: deletes them first.",
        ),
        print_config: bool = typer.Option(
            False, "--print-config", help="Print the resolved config as TOML and exit."
        ),
        threads: int = typer.Option(
            None, "--threads", min=1, help="CPU intra-op threads (default: chosen for the machine and model)."
        ),
    ) -> None:
        from bigasp.config import dump_toml, load_config
        from bigasp.train.config import RunConfig

        cfg = load_config(RunConfig, config, [*(set_ or []), *(overrides or [])])
        if print_config:
            typer.echo(dump_toml(cfg.model_dump(mode="json")))
            return
        from bigasp.train.distributed import shutdown
        from bigasp.train.preflight import check_sources
        from bigasp.train.trainer import train

        check_sources(cfg, resume=resume)  # before any model loads
        from bigasp import threads as thread_defaults

        explicit_workers = "num_workers" in cfg.data.model_fields_set
        plan = thread_defaults.apply(
            cfg.train.device,
            cfg.model.source,
            threads=threads,
            workers=cfg.data.num_workers if explicit_workers else None,
            override_hint="--threads and data.num_workers",
            with_workers=True,
        )
        cfg.data.num_workers = plan.workers

        try:
            result = train(cfg, resume=resume, stop_at=stop_at, overwrite=overwrite)
        finally:
            shutdown()
        import os

        if os.environ.get("RANK", "0") != "0":
            return  # one summary line per job, from rank 0
        typer.echo(
            f"done: {result.samples_seen:,} samples, {result.step} steps, {result.skipped_steps} skipped"
            + (f", last checkpoint {result.last_checkpoint}" if result.last_checkpoint else "")
            + (" (stopped by signal)" if result.stopped_by_signal else "")
        )
        import signal

        if result.stop_signal == signal.SIGINT:  # Ctrl-C: saved above, but the run did not finish
            typer.echo("interrupted: continue with `bigasp train CONFIG --resume auto`", err=True)
            raise typer.Exit(130)
