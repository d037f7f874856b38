"""`bigasp ingest` and `bigasp encode`.

Settings come from (lowest to highest priority): the section defaults, an optional TOML file
(`--config`; its `[ingest]` / `[encode]` table, or the top level), `--set key=value`
overrides, then the explicit flags below.
"""

from __future__ import annotations

import json
from typing import Any

import typer

CONFIG_HELP = "TOML file with the keys in an \\[ingest] / \\[encode] table, or at top level."
SET_HELP = "Override a config key, e.g. --set buckets.step=16 (repeatable)."


def _load(
    model,
    section: str,
    config: str | None,
    sets: list[str],
    flags: dict[str, Any],
    names: dict[str, str] | None = None,
):
    from bigasp.config import load_stage_config

    return load_stage_config(model, section, config, sets, flags, names)


def _print_counts(title: str, counts: dict[str, int]) -> None:
    if counts:
        typer.echo(title)
        for k, v in counts.items():
            typer.echo(f"  {k:<24} {v}")


def _column_map(pairs: list[str]) -> dict[str, str] | None:
    """`--column text=caption` options as {column: key}; None when none were given."""
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        col, eq, key = pair.partition("=")
        if not eq or not col or not key:
            raise typer.BadParameter(f"--column {pair!r}: write COLUMN=KEY, e.g. --column text=caption")
        out[col] = key
    return out


def ingest_cmd(
    sources: list[str] = typer.Argument(
        ...,
        help="Folders (recursive), uncompressed .tar shards, .parquet files (one image per row), .txt path "
        "lists, or URLs (s3://bucket/photos/, 's3://bucket/shards/{00000..01023}.tar': quote brace ranges).",
    ),
    out: str = typer.Option(
        ...,
        "--out",
        "-o",
        help="Dataset directory, or a URL (s3://bucket/ds: ingest runs in a local working copy, then writes the "
        "tables there); created if missing; re-runs follow the sources: new, changed and removed files.",
    ),
    work: str = typer.Option(
        None,
        "--work",
        help="With --out at a URL: the local working copy (default ~/.cache/bigasp/datasets/<hash of the URL>).",
    ),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    allow_upscale: bool = typer.Option(
        None, "--allow-upscale/--no-allow-upscale", help="Keep images smaller than their bucket."
    ),
    max_pixels: int = typer.Option(None, help="Reject images with more pixels (decompression-bomb guard)."),
    max_file_size: int = typer.Option(None, help="Reject files larger than this many bytes (default 2 GiB)."),
    animated: str = typer.Option(None, help="Animated images: reject or first_frame."),
    verify: str = typer.Option(None, help="header (fast, end-marker check) or decode (full decode)."),
    workers: int = typer.Option(None, help="Probe processes (1 = in-process)."),
    prune: bool = typer.Option(
        None, "--prune/--no-prune", help="Remove images gone from these sources (default: prune)."
    ),
    retry_rejects: bool = typer.Option(
        None, "--retry-rejects", help="Examine every earlier reject again, even if nothing changed."
    ),
    txt_tags: str = typer.Option(
        None, help="Read NAME.txt as: caption (default), tags (comma-separated list) or auto (see docs)."
    ),
    kohya_repeats: str = typer.Option(
        None, help="kohya N_name folders -> source name + repeats: auto (default), on or off."
    ),
    image_column: str = typer.Option(
        None,
        help="Parquet sources: the column with the image bytes (default: the one binary / {bytes} column).",
    ),
    columns: list[str] = typer.Option(
        [],
        "--column",
        help="Parquet sources: COLUMN=KEY reads a column as a sidecar key (e.g. text=caption); repeatable.",
    ),
    checksums: str = typer.Option(
        None, help="sha256 in sidecars/columns: auto (default; not img2dataset's), verify (all) or off."
    ),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Record images (+ sidecar captions/tags/scores) in DATASET/manifest.parquet; rejects in rejects.parquet."""
    from bigasp.prep.config import IngestConfig
    from bigasp.prep.ingest import IngestInterrupted, ingest

    cfg = _load(
        IngestConfig,
        "ingest",
        config,
        sets,
        dict(
            allow_upscale=allow_upscale,
            max_pixels=max_pixels,
            animated=animated,
            verify=verify,
            workers=workers,
            max_file_size=max_file_size,
            prune=prune,
            retry_rejects=retry_rejects,
            txt_tags=txt_tags,
            kohya_repeats=kohya_repeats,
            parquet_image_column=image_column,
            parquet_columns=_column_map(columns),
            checksums=checksums,
            progress=progress,
            work_dir=work,
        ),
        {"parquet_image_column": "--image-column", "parquet_columns": "--column", "work_dir": "--work"},
    )
    try:
        s = ingest(sources, out, cfg)
    except IngestInterrupted as stop:
        s = stop.summary
        typer.echo(
            f"ingest interrupted: {s.new} new, {s.updated} updated, {s.duplicates} duplicates and "
            f"{sum(s.rejects.values())} rejects examined before Ctrl-C are committed; "
            f"{s.total_images} images in {out}. Run the same command again to continue.",
            err=True,
        )
        raise SystemExit(130) from None  # 128 + SIGINT, the shell convention
    if as_json:
        typer.echo(json.dumps(s.to_json(), indent=2))
        return
    typer.echo(
        f"ingest: {s.scanned} scanned, {s.new} new, {s.updated} updated, {s.skipped} unchanged, "
        f"{s.duplicates} duplicates (merged), {s.retried} rejects retried, {s.removed} removed (gone from the "
        f"sources), {sum(s.rejects.values())} rejected in {s.seconds:.1f} s ({s.images_per_second:.0f} img/s); "
        f"{s.total_images} images in {out}"
        + (f"; {s.retries} transient object-storage failures retried" if s.retries else "")
    )
    _print_counts("rejects by reason:", dict(sorted(s.rejects.items())))


def encode_cmd(
    dataset: str = typer.Argument(..., help="Dataset directory made by `bigasp ingest`."),
    vae: str = typer.Option(
        None, "--vae", help="Preset (tiny, sdxl-base), diffusers VAE folder, or model path."
    ),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    batch_size: int = typer.Option(None, help="Images per VAE batch."),
    num_workers: int = typer.Option(None, help="Decode worker processes."),
    dtype: str = typer.Option(None, help="VAE precision: fp32 (default), bf16, fp16."),
    device: str = typer.Option(None, help="auto, cpu, cuda, cuda:1 ..."),
    seed: int = typer.Option(None, help="Seed for crops and latent sampling."),
    compression: str = typer.Option(None, help="none or zstd."),
    shard_size: int = typer.Option(None, help="Latents per shard."),
    variants: int = typer.Option(
        None, help="Latents per image (crop + VAE sample each); more adds new ones."
    ),
    retry_rejects: bool = typer.Option(
        None, "--retry-rejects", help="Encode again the images an earlier encode rejected."
    ),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """VAE-encode the manifest into latent shards. Multi-GPU / multi-node: launch with torchrun or srun."""
    from bigasp.prep.config import EncodeConfig
    from bigasp.prep.encode import encode

    cfg = _load(
        EncodeConfig,
        "encode",
        config,
        sets,
        dict(
            vae=vae,
            batch_size=batch_size,
            num_workers=num_workers,
            dtype=dtype,
            device=device,
            seed=seed,
            compression=compression,
            shard_size=shard_size,
            variants=variants,
            retry_rejects=retry_rejects,
            progress=progress,
        ),
    )
    try:
        s = encode(dataset, cfg)
    except KeyboardInterrupt as err:  # encode committed its finished shards; say what it kept
        from bigasp.errors import Interrupted

        raise Interrupted(str(err) or "encode stopped by Ctrl-C") from None
    if s.rank != 0:
        return
    if as_json:
        typer.echo(json.dumps(s.to_json(), indent=2))
        return
    typer.echo(
        f"encode: {s.encoded} encoded, {s.skipped} already done, {sum(s.rejects.values())} rejected, "
        f"{s.rejected_before} rejected before, "
        f"{s.shards} shards, {s.seconds:.1f} s ({s.images_per_second:.1f} img/s while encoding) "
        f"on {s.world_size} process(es)"
    )
    _print_counts("latents per bucket (WxH):", dict(sorted(s.per_bucket.items(), key=lambda kv: -kv[1])))
    _print_counts("rejects by reason:", dict(sorted(s.rejects.items())))
    if s.rejected_before:
        typer.echo(
            f"{s.rejected_before} image(s) an earlier encode rejected were not tried again (reasons: "
            f"`bigasp dataset info {dataset}`); fix them or use a safer setting (e.g. --dtype fp32), "
            "then re-run with --retry-rejects",
            err=True,
        )


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest_cmd)
    app.command("encode")(encode_cmd)
