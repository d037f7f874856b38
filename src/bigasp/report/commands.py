"""`bigasp dataset report DATASET --out DIR`, mounted on `bigasp dataset` by the store's commands."""

from __future__ import annotations

import typer


def report(
    dataset: str = typer.Argument(..., help="Dataset directory or fsspec URL."),
    out: str = typer.Option(..., "--out", "-o", help="Folder for index.html, the CSVs and the plots."),
    sample: int | None = typer.Option(
        None, "--sample", min=1, help="Analyse N rows drawn uniformly (seeded) for a quick look."
    ),
    aliases: str | None = typer.Option(
        None,
        "--aliases",
        help="Danbooru tag-alias export (JSON lines, .gz ok) to fold tags with, or `none`. "
        "Default: the table prompt synthesis uses — data.prompt.aliases_path of --config, else the "
        "shipped Danbooru table (builtin:danbooru) that the bigASP recipes use.",
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help="Run config: its [data] sets the chunk estimate and alias table."
    ),
    top_tags: int = typer.Option(30, "--top-tags", min=1, help="Tags in the co-occurrence matrix."),
    ngram_top: int = typer.Option(10_000, "--ngram-top", min=1, help="N-grams per n in ngrams.csv."),
    max_n: int = typer.Option(7, "--max-n", min=1, max=7, help="Longest n-gram."),
    ngrams: bool = typer.Option(True, "--ngrams/--no-ngrams", help="Count caption n-grams (the slow pass)."),
    noun_chunks: bool = typer.Option(
        False,
        "--noun-chunks",
        help="Count each spaCy noun chunk as one token (needs spaCy and a local model).",
    ),
    spacy_model: str = typer.Option("en_core_web_sm", "--spacy-model", help="spaCy model for --noun-chunks."),
    token_sample: int = typer.Option(
        100_000,
        "--token-sample",
        min=0,
        help="Captions tokenised with the CLIP tokenizer for real token counts.",
    ),
    min_tag_count: int = typer.Option(1, "--min-tag-count", min=1, help="Omit rarer tags from tags.csv."),
    seed: int = typer.Option(0, "--seed", help="Seeds --sample and the tokenised caption sample."),
    workers: int = typer.Option(
        1,
        "--workers",
        min=0,
        help="Processes for the caption pass (words, n-grams). 1 (default): in this process; N: N "
        "worker processes over row ranges; 0: one per core this process may use (from 1,000,000 "
        "captions on). On a 2-core machine the workers were slower than one process.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Tag counts, caption n-grams, score / bucket / length / chunk distributions: CSVs, plots, index.html."""
    from bigasp.report import ReportOptions, collect, write_report
    from bigasp.text.aliases import BUILTIN_DANBOORU, AliasTable
    from bigasp.train.data_commands import load_data_config

    cfg = load_data_config(config)
    if aliases is not None:
        path = None if aliases.lower() == "none" else aliases
    else:
        path = cfg.prompt.aliases_path if config else BUILTIN_DANBOORU
    table = AliasTable.load(path) if path else None
    opts = ReportOptions(
        sample=sample,
        seed=seed,
        top_tags=top_tags,
        ngram_top=ngram_top,
        max_n=max_n,
        ngrams=ngrams,
        noun_chunks=noun_chunks,
        spacy_model=spacy_model,
        token_sample=token_sample,
        progress=progress,
        workers=workers,
    )
    rep = collect(dataset, opts, data_cfg=cfg, aliases=table)
    page = write_report(rep, out, min_tag_count=min_tag_count)
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in rep.seconds.items())
    typer.echo(f"report of {rep.rows:,} images ({secs})")
    typer.echo(f"wrote {page}")


def register(dataset_app: typer.Typer) -> None:
    dataset_app.command("report")(report)
