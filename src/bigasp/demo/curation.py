"""The demo's raters and the check of what bigasp's quality stage recovered.

A team fills the ratings store through `bigasp quality arena`; the demo has no people, so
simulated raters judge pairs instead: each sees the photos' hidden quality and prefers the
better one with logistic noise, calling a tie now and then when the two look alike (the same
rater model as the quality study, `bigasp.quality.study.simulate_ratings`). Their judgements are
written as the Parquet file `bigasp quality export` writes, and `bigasp quality import` adds them
to the real ratings store; from there on, `quality train / rank / fit-scorer / score` are the
product's own. At the end, Spearman's rank correlation (scipy) between the hidden quality and
the score bigasp gave each photo says how much of it the pipeline recovered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from bigasp.quality.keys import rng
from bigasp.quality.ratings import EXPORT_SCHEMA

RATERS = 3
TEMPERATURE = 0.08  # logistic noise: a quality difference of 0.08 is judged right 73% of the time
TIE_RATE = 0.25  # P(tie) for two photos of equal quality, falling off with their difference
TIE_WIDTH = 0.08


def simulate_ratings(ids: Sequence[str], quality: Sequence[float], n: int, seed: int) -> pa.Table:
    """`n` judgements of random pairs as an export table (source 'simulated', raters sim-1..3).

    P(tie) = TIE_RATE * exp(-|dq| / TIE_WIDTH); otherwise the left photo wins with probability
    sigmoid(dq / TEMPERATURE), dq = q(left) - q(right). Pure function of the seed.
    """
    if len(ids) < 2:
        raise ValueError("simulated raters need at least two photos")
    q = np.asarray(quality, dtype=np.float64)
    rows: dict[str, list[str]] = {f.name: [] for f in EXPORT_SCHEMA}
    for k in range(n):
        g = rng(seed, "demo-rater", k)
        i, j = (int(v) for v in g.choice(len(ids), 2, replace=False))
        d = q[i] - q[j]
        if g.random() < TIE_RATE * np.exp(-abs(d) / TIE_WIDTH):
            outcome = "tie"
        else:
            outcome = "left" if g.random() < 1.0 / (1.0 + np.exp(-d / TEMPERATURE)) else "right"
        rows["left_id"].append(ids[i])
        rows["right_id"].append(ids[j])
        rows["outcome"].append(outcome)
        rows["rater"].append(f"sim-{k % RATERS + 1}")
        rows["source"].append("simulated")
        rows["created_at"].append(f"2026-01-01T00:00:{k % 60:02d}.000+00:00")
    return pa.table(rows, schema=EXPORT_SCHEMA)


def manifest_quality(
    dataset: Path, quality_by_file: Mapping[str, float]
) -> tuple[list[str], list[float], list]:
    """(ids, hidden quality, score) of every ingested photo, matched to its file name."""
    from bigasp.store import layout
    from bigasp.store.manifest import read_manifest

    fs, root = layout.url_to_fs(dataset)
    m = read_manifest(fs, root, ["id", "path", "score"]).to_pydict()
    ids, qs, scores = [], [], []
    for iid, path, score in zip(m["id"], m["path"], m["score"], strict=True):
        name = Path(path).name
        if name in quality_by_file:
            ids.append(iid)
            qs.append(quality_by_file[name])
            scores.append(score)
    return ids, qs, scores


def score_spearman(quality: Sequence[float], scores: Sequence[int | None]) -> float:
    """Spearman's rho (scipy) between hidden quality and bigasp's score, over photos with a score."""
    from scipy.stats import spearmanr

    pairs = [(q, s) for q, s in zip(quality, scores, strict=True) if s is not None]
    if len(pairs) < 3:
        raise ValueError("fewer than 3 scored photos: nothing to correlate")
    q, s = zip(*pairs, strict=True)
    return float(spearmanr(q, s).statistic)


EMBED_MODEL = "builtin:image-stats"  # the demo's stand-in for CLIP (docs/demo.md)


def curate(
    st, dataset: Path, out: Path, hidden: Mapping[str, float], *, seed: int, ratings: int,
    ingest_params: dict,
) -> str:  # fmt: skip
    """Embed, rate and score the ingested photos through the real CLI; returns the key of the scores
    (stages that read them are redone when it changes). `st` is the demo's `Stages`."""
    import shutil

    import pyarrow.parquet as pq

    from bigasp.demo.run import find_config

    quality_cfg = find_config("demo-quality.toml")
    embed_params = {**ingest_params, "embed": EMBED_MODEL}
    st.run("annotate", embed_params,
           lambda: st.cli("annotate", str(dataset), "--stage", "embed", "--embed-model", EMBED_MODEL,
                          "--device", "cpu", "--num-workers", "0", "--no-progress"))  # fmt: skip
    rate_params = {**embed_params, "ratings": ratings, "rating_seed": seed}
    ratings_file = out / "simulated-ratings.parquet"

    def rate() -> None:
        shutil.rmtree(dataset / "quality", ignore_errors=True)  # a fresh store: import appends
        ids, qs, _ = manifest_quality(dataset, hidden)
        pq.write_table(simulate_ratings(ids, qs, ratings, seed), ratings_file)
        st.echo(
            f"[demo] {ratings} judgements of simulated raters (they see the hidden quality): {ratings_file}"
        )
        st.cli("quality", "import", str(dataset), str(ratings_file))

    st.run("rate", rate_params, rate)
    quality_params = {**rate_params, "cfg": quality_cfg.read_text()}

    def quality() -> None:
        cfg = ["--config", str(quality_cfg)]
        st.cli("quality", "train", str(dataset), "--clip", EMBED_MODEL, *cfg)
        st.cli("quality", "rank", str(dataset), *cfg)
        st.cli("quality", "fit-scorer", str(dataset), *cfg)
        st.cli("quality", "score", str(dataset))

    st.run("quality", quality_params, quality)
    _, qs, scores = manifest_quality(dataset, hidden)
    st.echo(
        f"[demo] scores from bigasp's quality stage vs the hidden quality: Spearman {score_spearman(qs, scores):.3f}"
    )
    return st.key(quality_params)


def quality_figures(result, dataset: Path, hidden: Mapping[str, float], out: Path) -> None:
    """Fill the quality figures of `result` (a DemoResult) from the dataset's manifest."""
    _, qs, scores = manifest_quality(dataset, hidden)
    result.score_spearman = score_spearman(qs, scores)
    result.score_histogram = np.bincount([s for s in scores if s is not None], minlength=10).tolist()
    result.arena_command = f"bigasp quality arena {dataset}"
