"""`bigasp dataset verify` / `import-bigasp` and the printing of `dataset info`.

The `dataset` group holds commands of several layers (info and preview need the training
data config, report needs the report package), so the group is assembled at the top, in
`bigasp.cli`: this module only adds the storage layer's own commands to the group it is given
and never imports a higher layer.
"""

from __future__ import annotations

import json

import typer


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_info(d: dict, *, named: bool) -> None:
    """The human-readable `dataset info` of one dataset (`d` from `dataset_info`)."""
    name = f", name {d['name']}" if named else ""
    typer.echo(f"dataset {d['root']} (format {d['format_version']}{name})")
    typer.echo(f"  images     {d['images']}")
    typer.echo(f"  latents    {d['latents']}   not yet encoded {d['not_encoded']}")
    records = max(d["latent_records"], 1)
    per = sum(d["variant_bytes"].values()) / records
    typer.echo(
        "  variants   "
        + ", ".join(f"{k} per image: {n} images" for k, n in d["variants"].items())
        + f"   ({d['latent_records']} latents, {_human(int(per))} each)"
    )
    for v, n in d["variant_bytes"].items():
        typer.echo(f"    variant {v:<10} {_human(n)}")
    typer.echo(f"  rejects    {sum(d['rejects'].values())}")
    for reason, n in d["rejects"].items():
        typer.echo(f"    {reason:<32} {n}")
    typer.echo("  buckets (WxH: latents)")
    for name, n in d["buckets"].items():
        typer.echo(f"    {name:<12} {n}")
    if d.get("annotations"):
        typer.echo("  annotations (stage/model: images done, failed, coverage)")
        for key, c in d["annotations"].items():
            cover = c["done"] / d["images"] if d["images"] else 0.0
            typer.echo(f"    {key:<32} {c['done']:>8} {c['failed']:>6}  {cover:.1%}")
    typer.echo("  bytes on disk")
    for key, n in d["bytes"].items():
        typer.echo(f"    {key:<20} {_human(n)}")


def verify(
    dataset: str = typer.Argument(..., help="Dataset directory or fsspec URL."),
) -> None:
    """Check every shard's header and footer, that all shards share one encoding (VAE, scaling,
    seed), and every latent's checksum; exit 1 if anything is wrong."""
    from bigasp.store import LatentDataset

    ds = LatentDataset(dataset)
    errors = ds.verify()
    for e in errors:
        typer.echo(e, err=True)
    if errors:
        typer.echo(f"{len(errors)} problem(s) in {len(ds)} latents / {len(ds.shards)} shards", err=True)
        raise typer.Exit(1)
    typer.echo(f"{len(ds)} of {len(ds)} latents OK ({len(ds.shards)} shards)")


def import_bigasp_cmd(
    vaes: str = typer.Argument(..., help="bigASP's vaes/ folder (vaes/ab/cd/<md5>.bin.gz)."),
    out: str = typer.Option(..., "--out", "-o", help="New dataset directory."),
    index: str = typer.Option(None, help="bigASP's build-dataset.py Parquet (captions, tags, scores)."),
    compression: str = typer.Option("none", help="none or zstd."),
    shard_size: int = typer.Option(2048, help="Latents per shard."),
) -> None:
    """Convert an existing bigASP dataset (per-image .bin.gz latents) into a bigasp dataset."""
    from bigasp.store.importer import import_bigasp

    counts = import_bigasp(vaes, out, index=index, compression=compression, shard_size=shard_size)
    typer.echo(json.dumps(counts))


def register(group: typer.Typer) -> None:
    """Add the storage layer's commands to the `dataset` group (assembled in `bigasp.cli`)."""
    group.command("verify")(verify)
    group.command("import-bigasp")(import_bigasp_cmd)
