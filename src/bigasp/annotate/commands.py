"""`bigasp annotate DATASET` (run the stages), `bigasp annotate merge DATASET`, `bigasp bench annotate`.

Settings come from (lowest to highest priority): the defaults, an optional TOML file
(`--config`; its `[annotate]` table, or the top level), `--set key=value` overrides, then the
explicit flags. `bigasp annotate DATASET ...` is short for `bigasp annotate run DATASET ...`.
"""

from __future__ import annotations

import json
from typing import Any

import typer
from typer.core import TyperGroup

CONFIG_HELP = "TOML file with the keys in an \\[annotate] table (\\[merge] for merge), or at top level."
SET_HELP = "Override a config key, e.g. --set tags.threshold=0.5 (repeatable)."


class _RunByDefault(TyperGroup):
    """`bigasp annotate DATASET ...` runs the stages: a first word that is no subcommand means `run`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


annotate_app = typer.Typer(
    cls=_RunByDefault,
    no_args_is_help=True,
    help="Annotate images: CLIP embeddings, tags, watermark flags, captions (run), then merge into the manifest.",
)


def _load(model, section: str, config: str | None, sets: list[str], flags: dict[str, Any]):
    from bigasp.config import load_stage_config

    names = {"stages": "--stage", "caption.prompt_set": "--prompt-set"}
    return load_stage_config(model, section, config, sets, flags, names)


@annotate_app.command("run")
def run_cmd(
    dataset: str = typer.Argument(
        ..., help="Dataset directory made by `bigasp ingest`, or its URL (s3://bucket/ds; see work_dir)."
    ),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    stage: list[str] = typer.Option([], "--stage", help="embed, tags, watermark, caption (repeatable)."),
    embed_model: str = typer.Option(None, help="CLIP model folder (e.g. clip-vit-base-patch32)."),
    tags_model: str = typer.Option(None, help="Tagger folder: JoyTag or WD v3 (model.onnx + tag list)."),
    watermark_model: str = typer.Option(None, help="OWLv2 folder (e.g. owlv2-base-patch16-ensemble)."),
    caption_model: str = typer.Option(None, help="JoyCaption LLaVA folder."),
    prompt_set: str = typer.Option(None, help="alpha-two (bigASP v2), beta-one, or a TOML file."),
    device: str = typer.Option(None, help="auto, cpu, cuda, cuda:1 ..."),
    num_workers: int = typer.Option(None, help="Decode worker processes."),
    batch_size: int = typer.Option(None, help="Images decoded per loader batch."),
    part_size: int = typer.Option(None, help="Results per part file."),
    retry_failed: bool = typer.Option(
        None, "--retry-failed/--no-retry-failed", help="Retry recorded failures."
    ),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run the enabled stages on this rank's share. Multi-GPU / multi-node: launch with torchrun or srun."""
    from bigasp.annotate.config import AnnotateConfig
    from bigasp.annotate.run import annotate

    cfg = _load(
        AnnotateConfig,
        "annotate",
        config,
        sets,
        {
            "stages": stage,
            "embed.model": embed_model,
            "tags.model": tags_model,
            "watermark.model": watermark_model,
            "caption.model": caption_model,
            "caption.prompt_set": prompt_set,
            "device": device,
            "num_workers": num_workers,
            "batch_size": batch_size,
            "part_size": part_size,
            "retry_failed": retry_failed,
            "progress": progress,
        },
    )
    s = annotate(dataset, cfg)
    if s.rank != 0:
        return
    if as_json:
        typer.echo(json.dumps(s.to_json(), indent=2))
        return
    typer.echo(
        f"annotate: {s.seconds:.1f} s on {s.world_size} process(es), {s.images_decoded} images decoded"
    )
    for name, st in s.stages.items():
        failed = sum(st.failed.values())
        typer.echo(
            f"  {name:<10} {st.done} done, {st.skipped} already done, {failed} failed, {st.parts} part(s)"
            + (f"  failures: {dict(st.failed)}" if failed else "")
        )
    if s.stopped_early:
        typer.echo("  stopped after limit_parts; run again to continue")


@annotate_app.command("merge")
def merge_cmd(
    dataset: str = typer.Argument(..., help="Dataset directory, or its URL (s3://bucket/ds)."),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    precedence: str = typer.Option(None, help="sidecar (default: sidecar values win) or annotations."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Write the manifest's tags, captions, score and watermark columns from the annotation results."""
    from bigasp.annotate.config import MergeConfig
    from bigasp.annotate.merge import merge

    cfg = _load(MergeConfig, "merge", config, sets, {"precedence": precedence})
    report = merge(dataset, cfg)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    typer.echo(f"merge ({report['precedence']} values win):")
    for col, c in report["columns"].items():
        typer.echo(
            f"  {col:<10} {c['from_annotations']} from annotations, {c['from_sidecars']} from sidecars, "
            f"{c['empty']} empty"
        )


def bench_annotate_cmd(
    images: int = typer.Option(32, help="Generated JPEGs to annotate."),
    size: str = typer.Option("2048x1536", help="Generated image size WIDTHxHEIGHT (photos: 12-50 MP)."),
    num_workers: int = typer.Option(0, help="Decode worker processes."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto (cuda when present)."),
    json_out: str = typer.Option(
        None, "--json", help="Write the full result as JSON to this path ('-' prints it)."
    ),
) -> None:
    """Annotate images/s per stage on tiny models (embed, tags, watermark, caption, fused image pass)."""
    params = dict(locals())
    from bigasp.annotate.bench import run_annotate_bench
    from bigasp.bench.common import command_line, emit, resolve_device

    dev = resolve_device(device)
    params["device"] = str(dev)
    w, h = (int(v) for v in size.lower().split("x"))
    result = run_annotate_bench(
        images=images, width=w, height=h, num_workers=num_workers, seed=seed, device=dev,
        command=command_line("annotate", params),
    )  # fmt: skip
    emit(result, json_out, echo=typer.echo)


def register(app: typer.Typer) -> None:
    """Mount `annotate`; `bigasp.cli` adds `bench_annotate_cmd` to the bench group."""
    app.add_typer(annotate_app, name="annotate")
