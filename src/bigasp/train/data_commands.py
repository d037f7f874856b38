"""`bigasp dataset preview` and `bigasp dataset batches`: see what training will see, before training.

Both run the real training data path (split, buckets, epoch plan, prompt synthesis with the
run's keys) but never read a latent, so they are cheap even on a large dataset.
"""

from __future__ import annotations

import json
from typing import Any

import typer

BIGASP_CHUNKS = {
    3: 0.25,
    2: 0.66,
    1: 0.09,
}  # share of batches per chunk count (card, "Training Details (Version 1)")


def load_data_config(path: str | None, overrides: list[str] | None = None):
    """`[data]` of a run config (or a file that is only the data table), with `key=value` overrides."""
    from bigasp.config import apply_overrides, read_toml, validate
    from bigasp.train.data import DataConfig

    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        full = read_toml(path)
        raw = full["data"] if isinstance(full.get("data"), dict) else full
        source = f"{path} [data]" if isinstance(full.get("data"), dict) else str(path)
    raw = apply_overrides(raw, overrides or [])
    return validate(DataConfig, raw, source)


def data_config_for(datasets: list[str] | None, config: str | None, overrides: list[str] | None = None):
    """`[data]` of `--config` with DATASET arguments, when given, in place of its `data.dataset`."""
    from bigasp.errors import ConfigError

    cfg = load_data_config(config, overrides)
    if datasets:
        cfg = cfg.model_copy(update={"dataset": datasets[0] if len(datasets) == 1 else list(datasets)})
    if not cfg.dataset:
        raise ConfigError(
            "no dataset: give DATASET (one or more), or --config RUN.toml whose data.dataset is set"
        )
    return cfg


def _loader(
    datasets: list[str] | None, config: str | None, overrides: list[str], world_size: int, batch: int | None
):
    from bigasp.train.data import TrainLoader, open_dataset

    cfg = data_config_for(datasets, config, overrides)
    if cfg.stream:  # the streaming first pass depends on when shards are published: not plannable here
        typer.echo(
            "note: data.stream is set; shown is the order of a run started on the dataset as it is now "
            "(a streaming run's first pass follows the encoder in recorded waves, its rows in the order taken in)",
            err=True,
        )
    ds = open_dataset(cfg)
    return TrainLoader(ds, cfg, rank=0, world_size=world_size, seed=cfg.seed, device_batch_size=batch)


_SET_HELP = "Override a [data] key, e.g. --set prompt.tag_prob=0.5 (repeatable)."
_DATASETS_HELP = (
    "Dataset directories or fsspec URLs (several: trained as one, in this order). "
    "Default: data.dataset of --config."
)


def preview(
    dataset: list[str] | None = typer.Argument(None, help=_DATASETS_HELP, show_default=False),
    n: int = typer.Option(20, "--n", min=1, help="How many prompts to print."),
    epoch: int = typer.Option(0, "--epoch", help="Epoch whose order and prompt keys to use."),
    config: str | None = typer.Option(None, "--config", "-c", help="Run config (its [data] table is used)."),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP),
) -> None:
    """Print synthesised prompts exactly as training sees them in epoch E (first N of the epoch order).

    When the epoch plans fewer than N samples, says so and why (small dataset, bucket tails
    smaller than a batch, validation hold-out, score-0 exclusions) instead of stopping silently.
    """
    from bigasp.train.data import synthesize_rows

    loader = _loader(dataset, config, overrides, 1, None)
    plan = loader.plan(epoch)
    table = loader.dataset.table
    ids = table.column("id")
    names = table.column("dataset") if "dataset" in table.column_names else None  # several datasets
    shown = 0
    for p in range(plan.n_batches):
        rows = plan.batch_rows(p)
        bucket = int(plan.batch_bucket[p])
        prompts, _ = synthesize_rows(
            table,
            rows,
            seed=loader.seed,
            epoch=epoch,
            cfg=loader.cfg,
            aliases=loader.aliases,
            token_estimates=loader.token_estimates,
        )
        for r, prompt in zip(rows.tolist(), prompts, strict=True):
            where = f"{names[r].as_py()}:{ids[r].as_py()}" if names is not None else ids[r].as_py()
            typer.echo(f"[{r} {where} {loader.buckets.describe(bucket)}] {prompt!r}")
            shown += 1
            if shown >= n:
                return
    typer.echo(_why_fewer(loader, plan, epoch, shown, n), err=True)


def _why_fewer(loader, plan, epoch: int, shown: int, n: int) -> str:
    """Why `preview --n N` printed fewer than N prompts: where the dataset's rows went this epoch."""
    split = loader.split
    hints = []
    if plan.leftover_samples and plan.device_batch_size > 1:
        hints.append("--set device_batch_size=1")
    if len(split.validation):
        hints.append("--set validation_size=0")
    advice = f" To see more: {' '.join(hints)}." if hints else " The dataset holds no more training rows."
    return (
        f"showed {shown} of {n} prompts: epoch {epoch} trains on {shown} samples "
        f"({plan.n_batches} full batch(es) of {plan.device_batch_size}). Of the dataset's rows, "
        f"{len(loader.buckets.rows)} are for training, {plan.leftover_samples} of them left over this epoch "
        f"in bucket tails smaller than one batch; {len(split.validation)} are held out for validation; "
        f"{split.excluded} are excluded (score 0).{advice}"
    )


def batch_report(loader, epochs: int = 1, max_batches: int = 2000) -> dict[str, Any]:
    """Planned batches per epoch, drops, bucket usage, estimated and actual chunk counts."""
    import numpy as np

    from bigasp.text import tokenize
    from bigasp.text.chunking import n_chunks_for
    from bigasp.train.data import synthesize_rows

    b = loader.buckets
    w = loader.world_size
    out: dict[str, Any] = {
        "train_rows": len(b.rows),
        "validation_rows": len(loader.split.validation),
        "excluded_score_zero": loader.split.excluded,
        "device_batch_size": loader.device_batch_size,
        "world_size": w,
        "epochs": [],
    }
    describe = getattr(loader.dataset, "describe", None)
    if describe is not None:  # several datasets: each one's name, URL and rows in the combined table
        out["datasets"] = describe()
    for e in range(epochs):
        plan = loader.plan(e)
        steps = plan.steps_from(0, w)
        est = b.bucket_chunks[plan.batch_bucket[: steps * w]]
        out["epochs"].append(
            {
                "epoch": e,
                "steps": steps,
                "batches": steps * w,
                "dropped_samples": plan.leftover_samples + plan.tail_dropped(0, w) * plan.device_batch_size,
                "dropped_in_bucket_tails": plan.leftover_samples,
                "dropped_batches_at_end": plan.tail_dropped(0, w),
                "estimated_chunks": {int(c): int((est == c).sum()) for c in np.unique(est)},
            }
        )
    plan = loader.plan(0)
    used = np.bincount(plan.batch_bucket, minlength=b.n_buckets) * plan.device_batch_size
    out["buckets"] = [
        {
            "bucket": b.describe(k),
            "rows": int(b.counts[k]),
            "used_epoch0": int(used[k]),
            "too_small": bool(b.counts[k] < loader.device_batch_size),
        }
        for k in np.argsort(-b.counts)
    ]
    if loader.mix is not None:  # each group's configured share vs its share of epoch 0's trained samples
        groups = loader.mix.group_of_rows(b, len(loader.dataset.table))
        trained = np.bincount(
            groups[plan.trained_rows(plan.steps_from(0, w) * w)], minlength=len(loader.mix.names)
        )
        out["mix"] = {
            "by": loader.cfg.mix.by,
            "groups": [
                {**g, "trained_epoch0": int(t), "trained_share_epoch0": float(t) / max(int(trained.sum()), 1)}
                for g, t in zip(loader.mix.describe(), trained, strict=True)
            ],
        }
    n = min(max_batches, plan.n_batches)
    hist: dict[int, int] = {}
    batch_mismatch = sample_mismatch = samples = truncated = 0
    for p in range(n):
        rows = plan.batch_rows(p)
        prompts, _ = synthesize_rows(
            loader.dataset.table,
            rows,
            seed=loader.seed,
            epoch=0,
            cfg=loader.cfg,
            aliases=loader.aliases,
            token_estimates=loader.token_estimates,
        )
        lengths = [len(t) for t in tokenize(prompts)]
        own = [min(n_chunks_for(x), loader.cfg.max_chunks) for x in lengths]
        truncated += sum(1 for x in lengths if x > 75 * loader.cfg.max_chunks)
        padded = max(own)
        hist[padded] = hist.get(padded, 0) + 1
        estimate = int(b.bucket_chunks[plan.batch_bucket[p]])
        if estimate:
            batch_mismatch += int(padded != estimate)
            sample_mismatch += sum(1 for c in own if c != estimate)
        samples += len(rows)
    out["actual"] = {
        "batches_checked": n,
        "chunks_per_batch": {k: hist[k] for k in sorted(hist)},
        "batch_estimate_mismatch_rate": batch_mismatch / max(n, 1),
        "sample_estimate_mismatch_rate": sample_mismatch / max(samples, 1),
        "truncated_prompts": truncated,
    }
    return out


def batches(
    dataset: list[str] | None = typer.Argument(None, help=_DATASETS_HELP, show_default=False),
    config: str | None = typer.Option(None, "--config", "-c", help="Run config (its [data] table is used)."),
    overrides: list[str] = typer.Option([], "--set", help=_SET_HELP),
    epochs: int = typer.Option(1, "--epochs", help="Epochs to plan (drops differ per epoch)."),
    world_size: int = typer.Option(1, "--world-size", help="Ranks the run will use."),
    device_batch_size: int | None = typer.Option(
        None, "--device-batch-size", help="Default: data.device_batch_size."
    ),
    max_batches: int = typer.Option(
        2000, "--max-batches", help="Batches whose prompts are tokenised for actual counts."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Chunk counts per batch (estimated and actual), bucket usage and dropped samples per epoch."""
    loader = _loader(dataset, config, overrides, world_size, device_batch_size)
    r = batch_report(loader, epochs=epochs, max_batches=max_batches)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    typer.echo(
        f"train {r['train_rows']} rows (validation {r['validation_rows']}, score-0 excluded "
        f"{r['excluded_score_zero']}); device batch {r['device_batch_size']} x world {r['world_size']}"
    )
    for d in r.get("datasets", []):
        typer.echo(
            f"  dataset {d['name']:<16} {d['latents']:>9} latents  rows {d['rows'][0]}-{d['rows'][1] - 1}  {d['dataset']}"
        )
    for e in r["epochs"]:
        typer.echo(
            f"epoch {e['epoch']}: {e['steps']} steps, {e['batches']} batches, dropped {e['dropped_samples']} "
            f"samples ({e['dropped_in_bucket_tails']} in bucket tails, {e['dropped_batches_at_end']} batch(es) at end)"
        )
    a = r["actual"]
    total = max(a["batches_checked"], 1)
    typer.echo(
        f"chunks per batch, first {a['batches_checked']} batches of epoch 0 (bigASP v1 run: 25% / 66% / 9%):"
    )
    for c in sorted(a["chunks_per_batch"], reverse=True):
        ref = BIGASP_CHUNKS.get(c)
        ref_s = f"   (bigASP {ref:.0%})" if ref is not None else ""
        typer.echo(f"  {c * 75:>4} tokens ({c} chunk): {a['chunks_per_batch'][c] / total:6.1%}{ref_s}")
    typer.echo(
        f"estimate vs actual chunk count: {a['batch_estimate_mismatch_rate']:.1%} of batches, "
        f"{a['sample_estimate_mismatch_rate']:.1%} of samples differ; {a['truncated_prompts']} prompt(s) truncated"
    )
    if "mix" in r:
        typer.echo(
            f"mix by {r['mix']['by']} (images x repeats = per epoch; share planned, share in epoch 0's batches):"
        )
        for g in r["mix"]["groups"]:
            typer.echo(
                f"  {g['group'] or '(none)':<20} {g['images']:>9} x {g['repeats']:.3g} = {g['per_epoch']:>9}"
                f"   {g['share']:6.1%}   {g['trained_share_epoch0']:6.1%}"
            )
    typer.echo("buckets (rows, used in epoch 0):")
    for bk in r["buckets"]:
        flag = "   TOO SMALL for one batch" if bk["too_small"] else ""
        typer.echo(f"  {bk['bucket']:<16} {bk['rows']:>9} {bk['used_epoch0']:>9}{flag}")


def register(group: typer.Typer) -> None:
    """Add `preview` and `batches` to the `dataset` group (assembled in `bigasp.cli`)."""
    group.command("preview")(preview)
    group.command("batches")(batches)
