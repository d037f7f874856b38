"""`bigasp quality` end to end on the demo photos: ratings -> train -> rank -> fit-scorer -> score ->
scores in the annotations and the manifest (with provenance); export/import; Bradley–Terry."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from bigasp.cli import main as cli
from bigasp.quality.keys import rng
from bigasp.quality.pipeline import Paths
from bigasp.quality.ratings import RatingStore
from bigasp.store import annotations, layout
from bigasp.store.manifest import read_manifest
from quality_helpers import demo_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality-cli")
    root, clip, scores = demo_dataset(tmp, 24)
    # Simulated raters judge by the demo's sidecar score (degraded photos carry 1-3, clean 6-9).
    store = RatingStore(Paths(root).ratings)
    ids = sorted(scores)
    for k in range(120):
        g = rng(0, "cli-rater", k)
        i, j = (ids[v] for v in g.choice(len(ids), 2, replace=False))
        d = scores[i] - scores[j]
        outcome = "tie" if abs(d) <= 0 else ("left" if d > 0 else "right")
        store.add(i, j, outcome, rater=f"r{k % 2}")
    return root, clip, scores


def _run(capsys, *args):
    capsys.readouterr()
    cli(list(args))
    return capsys.readouterr().out


def test_pipeline_end_to_end(dataset, capsys, tmp_path):
    root, clip, _ = dataset
    small = ["--set", "samples=2048", "--set", "batch_size=64"]
    out = _run(capsys, "quality", "train", str(root), "--clip", str(clip), *small, "--json")
    report = json.loads(out)
    assert report["ratings"] == 120 and report["synthetic_pairs"] == report["rated_images"] > 0
    assert report["test"]["n_human_decisive"] > 0
    assert Paths(root).classifier.is_file()

    out = _run(capsys, "quality", "rank", str(root), "--set", "rounds=64", "--json")
    rank = json.loads(out)
    assert rank["images"] == 24 and sum(rank["bin_counts"]) == 24
    assert rank["bin_counts"][0] >= 1 and rank["bin_counts"][-1] >= 1  # min and max define the range
    assert Paths(root).ranking.with_suffix(".png").stat().st_size > 1000
    bins = pq.read_table(Paths(root).ranking).column("bin").to_numpy()
    assert bins.min() == 0 and bins.max() == 9

    _run(capsys, "quality", "fit-scorer", str(root), *small)
    assert Paths(root).scorer.is_file()

    out = _run(capsys, "quality", "score", str(root), "--json")
    s = json.loads(out)
    assert s["scored"] == 24 and s["manifest_rows"] == 24 and sum(s["histogram"]) == 24
    fs, path = layout.url_to_fs(root)
    manifest = read_manifest(fs, path)
    scores = manifest.column("score").to_numpy()
    assert np.all((scores >= 0) & (scores <= 9))
    part = annotations.read_stage(root, "quality", s["model_key"])
    assert part.column("score").type == "int8"
    by_id = dict(zip(part.column("id").to_pylist(), part.column("score").to_pylist(), strict=True))
    assert by_id == dict(zip(manifest.column("id").to_pylist(), scores.tolist(), strict=True))
    prov = json.loads((root / layout.DATASET_JSON).read_text())["annotations"]["stages"]["quality"]
    assert prov["model_key"] == s["model_key"] and len(prov["scorer_sha256"]) == 64
    assert annotations.read_provenance(annotations.list_parts(root, "quality", s["model_key"])[0])[
        "scorer_sha256"
    ]

    again = json.loads(_run(capsys, "quality", "score", str(root), "--json"))
    assert again["scored"] == 0 and again["already_scored"] == 24  # resumes: nothing redone


def test_export_import_and_bradley_terry(dataset, capsys, tmp_path):
    root, _, scores = dataset
    out = tmp_path / "ratings.parquet"
    _run(capsys, "quality", "export", str(root), str(out))
    assert pq.read_table(out).num_rows == RatingStore(Paths(root).ratings).count()
    other = tmp_path / "other.sqlite"
    _run(capsys, "quality", "import", str(root), str(out), "--ratings", str(other))
    assert RatingStore(other).count() == pq.read_table(out).num_rows

    ranking = tmp_path / "bt.parquet"
    report = json.loads(_run(capsys, "quality", "rank", str(root), "--method", "bradley-terry",
                             "--out", str(ranking), "--json"))  # fmt: skip
    assert report["method"] == "bradley-terry" and report["votes"] >= 120
    t = pq.read_table(ranking).to_pydict()
    truth = np.array([scores[i] for i in t["id"]])
    from scipy.stats import spearmanr

    assert spearmanr(t["rating"], truth).statistic > 0.7  # votes follow the demo's scores


def test_ratings_on_postgres_through_the_cli(dataset, capsys, tmp_path, postgres_url):
    root, _, _ = dataset
    local = tmp_path / "local.parquet"
    _run(capsys, "quality", "export", str(root), str(local))
    _run(capsys, "quality", "import", str(root), str(local), "--ratings", postgres_url)
    team = RatingStore(postgres_url)
    assert team.count() == RatingStore(Paths(root).ratings).count()
    back = tmp_path / "team.parquet"
    _run(capsys, "quality", "export", str(root), str(back), "--ratings", postgres_url)
    assert pq.read_table(back).equals(pq.read_table(local))
    report = json.loads(_run(capsys, "quality", "rank", str(root), "--method", "bradley-terry",
                             "--ratings", postgres_url, "--out", str(tmp_path / "bt.parquet"), "--json"))  # fmt: skip
    assert report["votes"] == team.count()


def test_user_errors_are_one_line(dataset, tmp_path, capsys):
    root, _, _ = dataset
    with pytest.raises(SystemExit) as e:
        cli(["quality", "train", str(root)])  # synthetic pairs need --clip
    assert e.value.code == 2
    assert "--clip" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["quality", "fit-scorer", str(root), "--ranking", str(tmp_path / "none.parquet")])
    assert "bigasp quality rank" in capsys.readouterr().err


def test_arena_shows_the_model_only_when_asked(dataset, tmp_path):
    import urllib.request

    from bigasp.quality.arena import create_app, serving
    from bigasp.quality.config import ArenaConfig
    from bigasp.quality.serve import build_arena

    root, _, _ = dataset
    if not Paths(root).classifier.is_file():
        cli(["quality", "train", str(root), "--set", "synthetic=false", "--set", "samples=512"])
    arena = build_arena(root, ArenaConfig(pool=24), ratings=tmp_path / "r.sqlite")
    assert arena.judge is not None  # the dataset's classifier was found
    with serving(create_app(arena), threads=2) as base:
        with urllib.request.urlopen(f"{base}/api/pair?mode=uncertain") as r:
            hidden = json.loads(r.read())
        assert "prediction" not in hidden and hidden["left"]["id"] != hidden["right"]["id"]
        with urllib.request.urlopen(f"{base}/api/pair?mode=random&predict=1") as r:
            shown = json.loads(r.read())
        assert 0.0 <= shown["prediction"] <= 1.0
        with urllib.request.urlopen(f"{base}/") as r:
            assert b'"random,uncertain"' in r.read()  # the mode menu offers uncertain with a model
