"""The steps behind `bigasp quality ...`, as functions of a dataset directory.

Artifacts live in DATASET/quality/ (see docs/quality.md): ratings.sqlite, classifier.safetensors
(+ .json report), ranking.parquet (+ .json, .png), scorer.safetensors (+ .json). Scores go to
DATASET/annotations/quality/<scorer key>/ and, when asked, the manifest's `score` column.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bigasp import __version__
from bigasp.errors import DataError
from bigasp.fsutil import atomic_write_text
from bigasp.quality import elo
from bigasp.quality.config import PairwiseConfig, RankConfig, ScorerConfig
from bigasp.quality.keys import key64, rng
from bigasp.quality.models import check_embedding_size, file_digest, load_model, save_model
from bigasp.quality.ratings import RatingStore, labels
from bigasp.store import layout
from bigasp.store.annotations import list_models, read_embeddings
from bigasp.store.layout import atomic_write_parquet

log = logging.getLogger(__name__)
QUALITY_DIR = "quality"


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def dir(self) -> Path:
        return self.root / QUALITY_DIR

    @property
    def ratings(self) -> Path:
        return self.dir / "ratings.sqlite"

    @property
    def classifier(self) -> Path:
        return self.dir / "classifier.safetensors"

    @property
    def ranking(self) -> Path:
        return self.dir / "ranking.parquet"

    @property
    def scorer(self) -> Path:
        return self.dir / "scorer.safetensors"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _manifest_refs(root: Path, ids: list[str]):
    from bigasp.quality.images import manifest_ref
    from bigasp.store.manifest import read_manifest

    fs, path = layout.url_to_fs(root)
    m = read_manifest(fs, path, ["id", "path", "tar_offset", "file_size", "orientation", "row"]).to_pydict()
    row = {i: k for k, i in enumerate(m["id"])}
    missing = [i for i in ids if i not in row]
    if missing:
        raise DataError(f"{root}: rated image {missing[0]} is not in the manifest ({len(missing)} missing)")
    return {
        i: (manifest_ref(m["path"][row[i]], m["tar_offset"][row[i]], m["file_size"][row[i]], m["row"][row[i]]),
            m["orientation"][row[i]] or 1)
        for i in ids
    }  # fmt: skip


def degraded_embeddings(
    root: Path, ids: list[str], embed: Callable, cfg: PairwiseConfig, batch: int = 64
) -> dict[str, np.ndarray]:
    """Embeddings of each image's degraded copy; the corruption is keyed by (seed, id)."""
    from bigasp.quality.images import degrade, open_image

    refs = _manifest_refs(root, ids)
    out: dict[str, np.ndarray] = {}
    for s in range(0, len(ids), batch):
        chunk = ids[s : s + batch]
        images = []
        for iid in chunk:
            ref, orient = refs[iid]
            im, _ = degrade(open_image(ref, orient), rng(cfg.seed, "degrade", iid),
                            blur_radius=cfg.blur_radius, jpeg_quality=cfg.jpeg_quality)  # fmt: skip
            images.append(im)
        for iid, vec in zip(chunk, embed(images), strict=True):
            out[iid] = vec
    return out


def train(
    root: str | Path, cfg: PairwiseConfig, *, clip: str | None = None, out: Path | None = None,
    ratings_db: str | Path | None = None, embed_key: str | None = None, embedder: Callable | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train the pairwise classifier on the dataset's ratings; returns the report."""
    from bigasp.quality.pairwise import build_examples, train_pairwise

    root = Path(root)
    paths = Paths(root)
    store = RatingStore(ratings_db or paths.ratings)
    pairs = labels(store.all(cfg.sources or None))
    if len(pairs) == 0:
        raise DataError(f"{store.path} has no ratings; rate pairs with `bigasp quality arena {root}` first")
    emb = read_embeddings(root, embed_key)
    rated = sorted(set(pairs.first) | set(pairs.second))
    vectors = dict(zip(rated, emb.lookup(rated).astype(np.float32), strict=True))
    degraded = None
    if cfg.synthetic:
        if embedder is None:
            if clip is None:
                raise DataError(
                    "pairwise.synthetic needs the CLIP model that made the embeddings: pass --clip PATH "
                    "(or --set synthetic=false to train on the ratings alone)"
                )
            import torch

            from bigasp.annotate.config import EmbedConfig
            from bigasp.annotate.embed import ClipEmbedder
            from bigasp.annotate.stats_embed import ImageStatsEmbedder, is_builtin_stats

            embedder = (
                ImageStatsEmbedder(EmbedConfig(model=clip))
                if is_builtin_stats(clip)
                else ClipEmbedder(EmbedConfig(model=str(clip)), torch.device("cpu"))
            )
        degraded = degraded_embeddings(root, rated, embedder, cfg)
        dim = next(iter(degraded.values())).shape[0]
        if dim != emb.vectors.shape[1]:
            raise DataError(
                f"--clip {clip} makes {dim}-d embeddings but the dataset's '{emb.model_key}' ones are "
                f"{emb.vectors.shape[1]}-d; pass the CLIP model that made them"
            )
    ex = build_examples(pairs, vectors, degraded)
    result = train_pairwise(ex, cfg)
    report = {
        "ratings": int(pairs.votes.sum()),
        "pairs": len(pairs),
        "rated_images": len(rated),
        "synthetic_pairs": len(degraded or {}),
        "train": result.train,
        "test": result.test,
        "embeddings": emb.model_key,
        "clip": clip,
        "config": cfg.model_dump(mode="json"),
        "bigasp_version": __version__,
    }
    out = out or paths.classifier
    save_model(result.model, out, report)
    _write_json(out.with_suffix(".json"), report)
    return report


def _sample_ids(ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(ids) <= n:
        return ids
    order = sorted(range(len(ids)), key=lambda k: key64(seed, "rank-sample", ids[k]))
    return ids[np.sort(np.array(order[:n]))]


def rank(
    root: str | Path, cfg: RankConfig, *, classifier: Path | None = None, out: Path | None = None,
    ratings_db: str | Path | None = None, embed_key: str | None = None, progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """ELO tournament (or Bradley–Terry fit) -> ratings -> equal-width bins; writes ranking.parquet."""
    root = Path(root)
    paths = Paths(root)
    if cfg.method == "elo":
        from bigasp.quality.pairwise import judge_fn

        classifier = classifier or paths.classifier
        from bigasp.quality.training import device

        model, _ = load_model(classifier, "quality-classifier")
        model = model.to(device())
        emb = read_embeddings(root, embed_key)
        check_embedding_size(model, classifier, emb.vectors, emb.model_key)
        ids = _sample_ids(emb.ids, cfg.images, cfg.seed)
        if len(ids) < 2:
            raise DataError(f"{root}: the tournament needs at least 2 images with embeddings")
        judge = judge_fn(model, emb.lookup(ids), cfg.batch_pairs, source=str(classifier))
        ratings = elo.tournament(judge, len(ids), rounds=cfg.rounds, k=cfg.k, start=cfg.start, seed=cfg.seed,
                                 on_round=progress)  # fmt: skip
        source: dict[str, Any] = {"classifier": str(classifier), "classifier_sha256": file_digest(classifier)}
    else:
        from bigasp.quality import bradley_terry

        store = RatingStore(ratings_db or paths.ratings)
        rows = store.all()
        if not rows:
            raise DataError(f"{store.path} has no ratings to fit Bradley–Terry strengths to")
        ids = np.array(sorted({r.left_id for r in rows} | {r.right_id for r in rows}), dtype=object)
        index = {i: k for k, i in enumerate(ids)}
        first = np.array([index[r.left_id] for r in rows])
        second = np.array([index[r.right_id] for r in rows])
        score = np.array([{"left": 1.0, "right": 0.0, "tie": 0.5}[r.outcome] for r in rows])
        strength = bradley_terry.fit(len(ids), first, second, score, alpha=cfg.bt_alpha)
        ratings = cfg.start + strength * 400.0 / np.log(10.0)  # on the ELO scale: same odds per point
        source = {"ratings": str(store.path), "votes": len(rows)}
    bins = elo.to_bins(ratings, cfg.bins)
    edges = elo.bin_edges(ratings, cfg.bins)
    table = pa.table(
        {"id": pa.array(list(ids), pa.string()), "rating": ratings, "bin": pa.array(bins, pa.int8())}
    )
    out = out or paths.ranking
    atomic_write_parquet(table, out)
    report = {
        "method": cfg.method,
        "images": len(ids),
        "edges": edges.tolist(),
        "bin_counts": np.bincount(bins, minlength=cfg.bins).tolist(),
        "config": cfg.model_dump(mode="json"),
        **source,
        "bigasp_version": __version__,
    }
    _write_json(out.with_suffix(".json"), report)
    plot_ranking(
        ratings, edges, out.with_suffix(".png"), title=f"{cfg.method.upper()} ratings of {len(ids)} images"
    )
    return report


def plot_ranking(ratings: np.ndarray, edges: np.ndarray, path: Path, *, title: str) -> Path:
    """Histogram of the ratings with the bin edges and each bin's score and count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bigasp.fsutil import atomic_path

    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    ax.hist(ratings, bins=max(20, min(100, len(ratings) // 20)), color="#4f7fbf")
    counts = np.bincount(elo.to_bins(ratings, len(edges) - 1), minlength=len(edges) - 1)
    for e in edges:
        ax.axvline(e, color="#c0504d", lw=1)
    top = ax.get_ylim()[1] * 1.3  # headroom for the labels above the bars
    ax.set_ylim(0, top)
    for b in range(len(edges) - 1):
        ax.text(
            (edges[b] + edges[b + 1]) / 2, top * 0.95, f"{b}\n{counts[b]}", ha="center", va="top", fontsize=8
        )
    ax.set_xlabel("rating (red lines: equal-width bin edges; labels: score, images)")
    ax.set_ylabel("images")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path, durable=False) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def fit_scorer(
    root: str | Path, cfg: ScorerConfig, *, ranking: Path | None = None, out: Path | None = None,
    embed_key: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    from bigasp.quality.scorer import train_scorer

    root = Path(root)
    paths = Paths(root)
    ranking = ranking or paths.ranking
    if not ranking.is_file():
        raise DataError(f"{ranking} does not exist; run `bigasp quality rank {root}` first")
    t = pq.read_table(ranking)
    meta = (
        json.loads(ranking.with_suffix(".json").read_text()) if ranking.with_suffix(".json").is_file() else {}
    )
    n_bins = int(meta.get("config", {}).get("bins", 10))
    ids = t.column("id").to_pylist()
    emb = read_embeddings(root, embed_key)
    result = train_scorer(ids, emb.lookup(ids), t.column("bin").to_numpy(), cfg, n_bins)
    report = {
        "images": len(ids),
        "train": result.train,
        "test": result.test,
        "ranking": str(ranking),
        "embeddings": emb.model_key,
        "config": cfg.model_dump(mode="json"),
        "bigasp_version": __version__,
    }
    out = out or paths.scorer
    save_model(result.model, out, report)
    _write_json(out.with_suffix(".json"), report)
    return report


def score(
    root: str | Path, *, scorer: Path | None = None, embed_key: str | None = None, manifest: bool = True,
    precedence: str = "annotations", batch: int = 65536, storage_options: dict[str, Any] | None = None,
    work_dir: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Score every embedded image not yet scored by this scorer; optionally fill the manifest.

    The manifest is filled through `bigasp annotate merge` (one code path for every annotation
    column: sidecar snapshot, lock, provenance, re-applied by later ingests). Scoring is an
    explicit request to score the dataset, so the model's scores win over sidecar scores by
    default (`precedence="sidecar"` keeps those).

    A dataset at a URL (s3://bucket/ds) is scored in this machine's working copy (`work_dir`,
    see `bigasp.store.workcopy`): its tables, embeddings and existing scores are pulled (the
    scores at the URL count as done), the new score parts are pushed, then the manifest is
    filled by `annotate merge`'s own URL path, which writes the manifest last.
    """
    from bigasp.store import remote

    if remote.is_url(str(root)):
        return _score_url(str(root).rstrip("/"), scorer=scorer, embed_key=embed_key, manifest=manifest,
                          precedence=precedence, batch=batch, storage_options=storage_options or {},
                          work_dir=work_dir)  # fmt: skip
    root = Path(root)
    scorer = scorer or Paths(root).scorer
    report, histogram = _score_parts(root, scorer, str(scorer), embed_key, batch)
    if manifest:
        report.update(_fill_manifest(str(root), report["model_key"], precedence, histogram))
    return report


def _score_parts(
    root: Path, scorer: Path, scorer_name: str, embed_key: str | None, batch: int
) -> tuple[dict[str, Any], list[int]]:
    """Score the embeddings not yet scored by `scorer` into quality parts; (report, histogram of all)."""
    from bigasp.quality import scoring
    from bigasp.quality.scorer import predict
    from bigasp.quality.training import device

    model, meta = load_model(scorer, "score-classifier")
    model = model.to(device())
    digest = file_digest(scorer)
    key = f"bigasp-scorer-{digest[:12]}"
    emb = read_embeddings(root, embed_key)
    check_embedding_size(model, scorer, emb.vectors, emb.model_key)
    done = scoring.scored_ids(root, key)
    todo = np.array([i not in done for i in emb.ids], bool)
    provenance = {
        "model": "bigasp ScoreClassifier",
        "scorer": scorer_name,
        "scorer_sha256": digest,
        "embeddings": emb.model_key,
        "bins": meta.get("bins"),
        "bigasp_version": __version__,
    }
    ids = list(emb.ids[todo])
    written: list[Path] = []
    if ids:
        scores, probs = predict(model, emb.vectors[todo], batch, ids=ids, source=str(scorer))
        written = scoring.write_scores(root, key, ids, scores, probs, provenance)
    report: dict[str, Any] = {"model_key": key, "scored": len(ids), "already_scored": int((~todo).sum()),
                              "parts": [str(p) for p in written]}  # fmt: skip
    _, all_scores = scoring.read_scores(root, key) if len(emb.ids) else ([], np.zeros(0, np.int8))
    histogram = np.bincount(all_scores.astype(int), minlength=int(meta["bins"])).tolist()
    warning = one_bin_warning(histogram, scorer)
    if warning:
        log.warning("%s", warning)
        report["warning"] = warning
    return report, histogram


def _fill_manifest(
    dataset: str, key: str, precedence: str, histogram: list[int], **url_options: Any
) -> dict[str, Any]:
    """The manifest's `score` column from the quality parts of `key`, through `bigasp annotate merge`."""
    from bigasp.annotate.config import MergeConfig
    from bigasp.annotate.merge import merge
    from bigasp.quality import scoring

    cfg = MergeConfig(precedence=precedence, columns=["score"], models={scoring.STAGE: key}, **url_options)
    merged = merge(dataset, cfg)["columns"]["score"]
    return {"manifest_rows": merged["from_annotations"], "histogram": histogram}


def _score_url(
    url: str, *, scorer: Path | None, embed_key: str | None, manifest: bool, precedence: str, batch: int,
    storage_options: dict[str, Any], work_dir: str | None,
) -> dict[str, Any]:  # fmt: skip
    from bigasp.quality import scoring
    from bigasp.store import workcopy

    local = workcopy.work_dir(url, work_dir)
    workcopy.pull(url, local, storage_options, annotations=("embed", scoring.STAGE))
    if not (local / layout.MANIFEST).is_file():
        raise DataError(
            f"{url} has no {layout.MANIFEST}; make the dataset with `bigasp ingest ... --out {url}`"
        )
    if not list_models(local, "embed"):
        raise DataError(f"{url} has no embeddings yet; run `bigasp annotate {url} --stage embed` first")
    if scorer is None:  # the default scorer is the dataset's own quality/scorer.safetensors
        name = f"{QUALITY_DIR}/scorer.safetensors"
        scorer = workcopy.pull_file(url, local, name, storage_options)
        if scorer is None:
            raise DataError(
                f"{url}/{name} does not exist: pass --scorer FILE, the scorer `bigasp quality fit-scorer` made "
                "on a local sample of the photos (SAMPLE/quality/scorer.safetensors), or upload it there"
            )
        scorer_name = f"{url}/{name}"
    else:
        scorer_name = str(scorer)
    report, histogram = _score_parts(local, scorer, scorer_name, embed_key, batch)
    workcopy.push(url, local, storage_options, tables=(), annotations=True)  # the scores, before the manifest
    report.update(dataset=url, work_dir=str(local))
    if manifest:  # annotate merge's URL path: the copy is current, the manifest goes to the URL last
        report.update(_fill_manifest(url, report["model_key"], precedence, histogram,
                                     storage_options=storage_options, work_dir=str(local)))  # fmt: skip
    return report


ONE_BIN_SHARE = 0.95  # a healthy scorer spreads images over several bins; 95% in one is a broken model
ONE_BIN_MIN_IMAGES = 20  # below this, one bin holding everything can be chance


def one_bin_warning(histogram: list[int], scorer: Path) -> str | None:
    """A loud warning when one score holds (nearly) every image, above all score 0, which training skips."""
    total = sum(histogram)
    if total < ONE_BIN_MIN_IMAGES:
        return None
    top = int(np.argmax(histogram))
    if histogram[top] < ONE_BIN_SHARE * total:
        return None
    msg = (
        f"WARNING: {histogram[top]} of {total} images ({histogram[top] / total:.0%}) got score {top} from "
        f"{scorer}: the scorer does not tell images apart; check its report ({scorer.with_suffix('.json')}) "
        "and the ranking's bins before training on these scores"
    )
    if top == 0:
        msg += " (images with score 0 are left out of training: data.exclude_score_zero)"
    return msg
