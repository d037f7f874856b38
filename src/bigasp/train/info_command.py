"""`bigasp dataset info`: what is in each dataset a run's `[data]` trains on.

It lives in the training layer because `--config` resolves datasets the way training does
(`data.dataset`, several datasets, storage options); the numbers and their printing come from
the storage layer (`bigasp.store.info`, `bigasp.store.commands.print_info`).
"""

from __future__ import annotations

import json

import typer


def info(
    dataset: list[str] | None = typer.Argument(
        None,
        help="Dataset directories or fsspec URLs. Default: data.dataset of --config.",
        show_default=False,
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help="Run config: describe each dataset its [data] trains on."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON (a list for several)."),
) -> None:
    """Images, rejects by reason, bucket histogram and bytes on disk (of each dataset)."""
    from bigasp.store.commands import print_info
    from bigasp.store.info import dataset_info
    from bigasp.train.data_commands import data_config_for
    from bigasp.train.datasets import dataset_specs

    cfg = data_config_for(dataset, config)
    specs = dataset_specs(cfg)
    infos = [dataset_info(s.url, s.storage_options) | {"name": s.name} for s in specs]
    if as_json:
        typer.echo(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
        return
    for d in infos:
        print_info(d, named=len(infos) > 1)
    if len(infos) > 1:
        typer.echo(
            f"{len(infos)} datasets trained as one: {sum(d['latents'] for d in infos)} latents "
            f"({', '.join(str(d['name']) + ' ' + str(d['latents']) for d in infos)})"
        )


def register(group: typer.Typer) -> None:
    """Add `info` to the `dataset` group (assembled in `bigasp.cli`)."""
    group.command("info")(info)
