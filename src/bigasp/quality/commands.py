"""`bigasp quality arena | train | rank | fit-scorer | score | export | import`.

Settings come from (lowest to highest priority): the section defaults (bigASP's recipe), an
optional TOML file (`--config`, with [pairwise] / [rank] / [scorer] / [score] / [arena] tables),
then `--set key=value` overrides of the command's own section.

`score` also takes a dataset at a URL (s3://bucket/ds), scored in a local working copy; the
other commands need a local dataset (a sample of the photos ingested and embedded on this
machine) and say so in one line when given a URL.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from bigasp.errors import BigaspError

quality_app = typer.Typer(
    help="Quality scores 0-9 the bigASP way: rate pairs, train, rank, fit the scorer, score.",
    no_args_is_help=True,
)
CONFIG_HELP = "TOML file with \\[pairwise] / \\[rank] / \\[scorer] / \\[score] / \\[arena] tables."
SET_HELP = "Override a key of this command's section, e.g. --set samples=20000 (repeatable)."
DATASET_HELP = "Dataset directory (made by `bigasp ingest`, with embeddings from `bigasp annotate`)."
RATINGS_HELP = (
    "Ratings database: a SQLite file (default DATASET/quality/ratings.sqlite) or a team's "
    "postgresql://user@host/db URL."
)
EMBED_HELP = "Model key of the embeddings to use (needed only when the dataset has several)."


def _local(dataset: str, command: str) -> Path:
    """The dataset folder; a URL is one line: this command needs a local dataset."""
    from bigasp.store import remote

    if remote.is_url(dataset):
        raise BigaspError(
            f"`bigasp quality {command}` needs a local dataset, not {dataset}: rate, train, rank and fit the "
            "scorer on a local sample (e.g. `bigasp ingest SOME_SHARDS --out sample` and `bigasp annotate sample "
            "--embed-model CLIP`, the CLIP that embedded the bucket's dataset), then score the dataset at the URL "
            f"with `bigasp quality score {dataset} --scorer sample/quality/scorer.safetensors` (docs/quality.md)"
        )
    return Path(dataset)


def _cfg(section: str, config: str | None, sets: list[str]):
    from bigasp.config import apply_overrides, read_toml, validate
    from bigasp.quality.config import QualityConfig

    data = read_toml(config) if config else {}
    sec = dict(data.get(section) or {})
    sec = apply_overrides(sec, sets or [])
    return getattr(validate(QualityConfig, {**data, section: sec}, config or "command-line flags"), section)


def _echo_json(report: dict) -> None:
    typer.echo(json.dumps(report, indent=2, sort_keys=True, default=str))


@quality_app.command("arena")
def arena_cmd(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on; anything but loopback is reachable by others."
    ),
    port: int = typer.Option(5034, help="Port (bigASP's arena used 5034; 0 = any free port)."),
    token: str = typer.Option(
        None,
        "--token",
        envvar="BIGASP_ARENA_TOKEN",
        help="Shared secret raters must pass once as ?token=...; required in practice with --host.",
    ),
    allow_host: list[str] = typer.Option(
        [],
        "--allow-host",
        help="Also answer requests addressed to this host name, e.g. arena.example.lan (repeatable). "
        "Otherwise only loopback names, the --host address and (with --host 0.0.0.0) IP addresses "
        "are answered, so that other web sites cannot reach the arena by DNS rebinding.",
    ),
    ratings: str = typer.Option(None, help=RATINGS_HELP),
    classifier: Path = typer.Option(
        None,
        help="Pairwise model for predictions and uncertain/flagged modes "
        "(default DATASET/quality/classifier.safetensors when it exists).",
    ),
    flagged: Path = typer.Option(
        None, help="Text file of image ids (one per line) forming the flagged class."
    ),
    embed_key: str = typer.Option(None, "--embed-key", help=EMBED_HELP),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Serve the rating web app until Ctrl-C (rate with the mouse or ← → space, undo with z)."""
    from bigasp.quality.serve import build_arena, run_server

    root = _local(dataset, "arena")
    cfg = _cfg("arena", config, sets)
    arena = build_arena(root, cfg, ratings=ratings, classifier=classifier, flagged=flagged,
                        embed_key=embed_key, token=token)  # fmt: skip
    run_server(
        arena, host=host, port=port, threads=cfg.threads, echo=typer.echo, allow_hosts=tuple(allow_host)
    )


@quality_app.command("train")
def train_cmd(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    clip: str = typer.Option(
        None, "--clip", help="Local CLIP folder that made the embeddings (embeds the blurred/JPEG copies)."
    ),
    ratings: str = typer.Option(None, help=RATINGS_HELP),
    out: Path = typer.Option(None, help="Model file (default DATASET/quality/classifier.safetensors)."),
    embed_key: str = typer.Option(None, "--embed-key", help=EMBED_HELP),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Train bigASP's pairwise quality classifier on the ratings."""
    from bigasp.quality.pipeline import train

    r = train(
        _local(dataset, "train"),
        _cfg("pairwise", config, sets),
        clip=clip,
        out=out,
        ratings_db=ratings,
        embed_key=embed_key,
    )
    if as_json:
        _echo_json(r)
        return
    acc = r["test"].get("accuracy_human_decisive")
    typer.echo(
        f"train: {r['ratings']} ratings of {r['pairs']} pairs, {r['synthetic_pairs']} synthetic pairs; held-out "
        f"accuracy on decisive rated pairs: {'n/a' if acc is None else f'{acc:.3f}'} "
        f"({r['test'].get('n_human_decisive', 0)} examples)"
    )


@quality_app.command("rank")
def rank_cmd(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    method: str = typer.Option(
        None, help="elo (tournament judged by the classifier) or bradley-terry (votes)."
    ),
    classifier: Path = typer.Option(
        None, help="Pairwise model (default DATASET/quality/classifier.safetensors)."
    ),
    ratings: str = typer.Option(None, help=RATINGS_HELP + " Used by bradley-terry."),
    out: Path = typer.Option(None, help="Ranking file (default DATASET/quality/ranking.parquet)."),
    embed_key: str = typer.Option(None, "--embed-key", help=EMBED_HELP),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Rank images (ELO tournament or Bradley–Terry) and cut the range into equal-width bins."""
    from bigasp.quality.pipeline import rank

    cfg = _cfg("rank", config, sets + ([f'method="{method}"'] if method else []))
    r = rank(
        _local(dataset, "rank"), cfg, classifier=classifier, out=out, ratings_db=ratings, embed_key=embed_key
    )
    if as_json:
        _echo_json(r)
        return
    typer.echo(f"rank ({r['method']}): {r['images']} images; images per bin 0..{len(r['bin_counts']) - 1}: "
               f"{r['bin_counts']}")  # fmt: skip


@quality_app.command("fit-scorer")
def fit_scorer_cmd(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    ranking: Path = typer.Option(None, help="Ranking file (default DATASET/quality/ranking.parquet)."),
    out: Path = typer.Option(None, help="Model file (default DATASET/quality/scorer.safetensors)."),
    embed_key: str = typer.Option(None, "--embed-key", help=EMBED_HELP),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    sets: list[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Train bigASP's score classifier: embedding -> bin (the score 0-9)."""
    from bigasp.quality.pipeline import fit_scorer

    r = fit_scorer(
        _local(dataset, "fit-scorer"),
        _cfg("scorer", config, sets),
        ranking=ranking,
        out=out,
        embed_key=embed_key,
    )
    if as_json:
        _echo_json(r)
        return
    t = r["test"]
    typer.echo(f"fit-scorer: {r['images']} ranked images; held-out accuracy {t.get('accuracy', float('nan')):.3f}, "
               f"within one bin {t.get('within_one', float('nan')):.3f} ({t.get('images', 0)} images)")  # fmt: skip


@quality_app.command("score")
def score_cmd(
    dataset: str = typer.Argument(
        ...,
        help=DATASET_HELP + " Or its URL (s3://bucket/ds), scored in a local working copy (see --work).",
    ),
    scorer: Path = typer.Option(
        None,
        help="Score model (default DATASET/quality/scorer.safetensors; for a dataset at a URL it is "
        "downloaded from there, else pass the file fit-scorer made on a local sample).",
    ),
    manifest: bool = typer.Option(
        True, "--manifest/--no-manifest", help="Also write `score` into the manifest."
    ),
    precedence: str = typer.Option(
        "annotations", help="annotations (default: the model's score wins) or sidecar (sidecar scores win)."
    ),
    embed_key: str = typer.Option(None, "--embed-key", help=EMBED_HELP),
    work: str = typer.Option(
        None,
        "--work",
        help="For a dataset at a URL: this machine's working copy (default ~/.cache/bigasp/datasets/<hash of "
        "the URL>, or $BIGASP_WORK_DIR/<hash>).",
    ),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    sets: list[str] = typer.Option(
        [],
        "--set",
        help="Override a key of \\[score], e.g. --set storage_options.endpoint_url=http://... (repeatable).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Score every image with an embedding (annotations/quality/), and fill the manifest's `score`."""
    from bigasp.quality.pipeline import score

    if precedence not in ("annotations", "sidecar"):
        raise BigaspError(f"--precedence {precedence!r}: use 'annotations' or 'sidecar'")
    cfg = _cfg("score", config, sets)
    r = score(dataset, scorer=scorer, embed_key=embed_key, manifest=manifest, precedence=precedence,
              storage_options=cfg.storage_options, work_dir=work or cfg.work_dir or None)  # fmt: skip
    if as_json:
        _echo_json(r)
        return
    msg = f"score: {r['scored']} new, {r['already_scored']} already scored ({r['model_key']})"
    if manifest:
        msg += f"; manifest rows updated: {r['manifest_rows']}; images per score: {r['histogram']}"
    typer.echo(msg)


@quality_app.command("export")
def export_cmd(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    out: Path = typer.Argument(..., help="Parquet file to write."),
    ratings: str = typer.Option(None, help=RATINGS_HELP),
) -> None:
    """Export every rating as Parquet (left_id, right_id, outcome, rater, source, created_at)."""
    from bigasp.quality.pipeline import Paths
    from bigasp.quality.ratings import RatingStore
    from bigasp.store.layout import atomic_write_parquet

    table = RatingStore(ratings or Paths(_local(dataset, "export")).ratings).export_table()
    atomic_write_parquet(table, out)
    typer.echo(f"export: {table.num_rows} ratings -> {out}")


@quality_app.command("import")
def import_cmd(
    dataset: str = typer.Argument(..., help=DATASET_HELP),
    file: Path = typer.Argument(..., help="Parquet file written by `bigasp quality export`."),
    ratings: str = typer.Option(None, help=RATINGS_HELP),
) -> None:
    """Append the ratings of an exported Parquet file (e.g. from another rater's machine)."""
    import pyarrow.parquet as pq

    from bigasp.errors import DataError
    from bigasp.quality.pipeline import Paths
    from bigasp.quality.ratings import RatingStore

    try:
        table = pq.read_table(file)
    except Exception as err:
        raise DataError(f"{file}: not a readable Parquet file ({err})") from err
    n = RatingStore(ratings or Paths(_local(dataset, "import")).ratings).import_table(table, str(file))
    typer.echo(f"import: {n} ratings from {file}")


def register(app: typer.Typer) -> None:
    app.add_typer(quality_app, name="quality")
