"""`bigasp quality score` on a dataset that lives only in a bucket (a real local S3 API server,
moto): photos at s3:// -> ingest --out URL -> annotate (builtin:image-stats embeddings) at the
URL; a scorer made by the quality pipeline on a local copy; scoring the URL gives the same
quality parts and manifest `score` column as scoring the local copy, a re-run (any working copy)
scores nothing again, new photos alone are scored; the default scorer is taken from the URL's
quality/ folder or its absence is one line; the other quality commands given a URL say in one
line that they need a local dataset, and leave no stray folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bigasp.buckets import BucketConfig
from bigasp.cli import main as cli
from bigasp.quality.keys import rng
from bigasp.quality.pipeline import Paths, score
from bigasp.quality.ratings import RatingStore
from bigasp.store import annotations, layout, remote
from bigasp.store.manifest import read_manifest
from s3_helpers import LOCAL_S3_ENV

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "quality"
URL = f"s3://{BUCKET}/ds"
DEMO_BUCKETS = BucketConfig(step=16, min_area=3072, max_area=4096, min_aspect=0.5, max_aspect=2.0)


@pytest.fixture(scope="module")
def server():
    from bigasp.bench.s3server import local_s3

    with pytest.MonkeyPatch.context() as mp:
        for k, v in LOCAL_S3_ENV.items():
            mp.setenv(k, v)
        with local_s3() as endpoint:
            opts = {"endpoint_url": endpoint, "use_listings_cache": False}
            s3fs.S3FileSystem(**opts).mkdir(BUCKET)
            yield opts
    remote.configure(None)


def fs_of(opts):
    return s3fs.S3FileSystem(**opts, skip_instance_cache=True)


def ingest_and_embed(opts, tmp: Path, n: int) -> None:
    """The first `n` demo photos (PNG + JSON sidecar with a score) in the bucket, ingested to URL and
    embedded there; every step works in a local working copy, re-runs add only the new photos."""
    from bigasp.annotate.config import AnnotateConfig
    from bigasp.annotate.run import annotate
    from bigasp.demo.synthetic import write_photos
    from bigasp.prep.config import IngestConfig
    from bigasp.prep.ingest import ingest

    photos = tmp / "photos"
    write_photos(photos, n, seed=0, broken=False)
    fs_of(opts).put(str(photos) + "/", f"{BUCKET}/photos/", recursive=True)
    icfg = IngestConfig(
        buckets=DEMO_BUCKETS, progress=False, storage_options=opts, work_dir=str(tmp / "w-ingest")
    )
    assert ingest([f"s3://{BUCKET}/photos/"], URL, icfg).total_images == n
    acfg = AnnotateConfig(stages=["embed"], embed={"model": "builtin:image-stats"}, device="cpu", num_workers=0,
                          batch_size=8, progress=False, storage_options=opts, work_dir=str(tmp / "w-annotate"))  # fmt: skip
    annotate(URL, acfg)


def url_manifest(opts) -> dict[str, int | None]:
    """id -> score of the manifest at the URL, read back through the store."""
    remote.configure(opts)
    fs, path = remote.filesystem(URL)
    fs.invalidate_cache()
    m = read_manifest(fs, path, ["id", "score"]).to_pydict()
    return dict(zip(m["id"], m["score"], strict=True))


def url_quality_parts(opts, key: str, dest: Path) -> pa.Table:
    """The URL's quality parts of `key`, read as a dataset's stage (sorted by id)."""
    fs_of(opts).get(f"{BUCKET}/ds/{annotations.ANNOTATIONS_DIR}/quality", str(dest / "annotations" / "quality"),
                    recursive=True)  # fmt: skip
    return annotations.read_stage(dest, "quality", key).sort_by("id")


def make_scorer(local: Path, out: Path, capsys) -> Path:
    """The quality pipeline on a local copy: ratings (a rater who prefers the higher sidecar score)
    -> rank (Bradley–Terry) -> fit-scorer; the scorer copied out of the dataset."""
    fs, path = layout.url_to_fs(local)
    m = read_manifest(fs, path, ["id", "score"]).to_pydict()
    truth = dict(zip(m["id"], m["score"], strict=True))
    ids = sorted(truth)
    store = RatingStore(Paths(local).ratings)
    for k in range(80):
        i, j = (ids[v] for v in rng(0, "url-rater", k).choice(len(ids), 2, replace=False))
        d = truth[i] - truth[j]
        store.add(i, j, "tie" if d == 0 else ("left" if d > 0 else "right"), rater="r1")
    cli(["quality", "rank", str(local), "--method", "bradley-terry"])
    cli(["quality", "fit-scorer", str(local), "--set", "samples=512", "--set", "batch_size=32"])
    capsys.readouterr()
    shutil.copyfile(Paths(local).scorer, out)
    return out


def run_cli(capsys, *args: str) -> dict:
    capsys.readouterr()
    cli(["quality", "score", *args, "--json"])
    return json.loads(capsys.readouterr().out)


def test_score_a_bucket_dataset_like_its_local_copy(server, tmp_path, capsys):
    opts = server
    ingest_and_embed(opts, tmp_path, 12)
    local = tmp_path / "local-copy"  # the same dataset, downloaded
    fs_of(opts).get(f"{BUCKET}/ds", str(local), recursive=True)
    assert (local / layout.MANIFEST).is_file() and annotations.list_models(local, "embed") == ["image-stats"]
    scorer = make_scorer(local, tmp_path / "scorer.safetensors", capsys)

    here = run_cli(capsys, str(local), "--scorer", str(scorer))
    assert here["scored"] == here["manifest_rows"] == 12
    endpoint = ["--set", f"storage_options.endpoint_url={opts['endpoint_url']}"]
    there = run_cli(capsys, URL, "--scorer", str(scorer), "--work", str(tmp_path / "w1"), *endpoint)
    assert (there["scored"], there["already_scored"], there["manifest_rows"]) == (12, 0, 12)
    assert there["model_key"] == here["model_key"] and there["histogram"] == here["histogram"]
    assert there["dataset"] == URL and there["work_dir"] == str(tmp_path / "w1")

    # the same quality parts and manifest scores as the local copy's, at the URL
    key = here["model_key"]
    want = annotations.read_stage(local, "quality", key).sort_by("id")
    got = url_quality_parts(opts, key, tmp_path / "from-url")
    assert got.select(["id", "score", "probs"]).equals(want.select(["id", "score", "probs"]))
    fs, path = layout.url_to_fs(local)
    m = read_manifest(fs, path, ["id", "score"]).to_pydict()
    local_scores = dict(zip(m["id"], m["score"], strict=True))
    assert url_manifest(opts) == local_scores and None not in local_scores.values()
    assert local_scores == dict(
        zip(want.column("id").to_pylist(), want.column("score").to_pylist(), strict=True)
    )
    with fs_of(opts).open(f"{BUCKET}/ds/{layout.DATASET_JSON}") as f:
        merged = json.load(f)["annotations"]
    assert merged["stages"]["quality"]["model_key"] == key and merged["columns"]["score"]["model"] == key
    names = [n.split("/ds/", 1)[1] for n in fs_of(opts).find(f"{BUCKET}/ds")]
    assert not [n for n in names if n.startswith(("parts/", "quality/")) or "lock" in n or "/." in "/" + n]

    # re-runs score nothing: on this machine, and on another one (a fresh working copy)
    again = run_cli(capsys, URL, "--scorer", str(scorer), "--work", str(tmp_path / "w1"), *endpoint)
    other = score(URL, scorer=scorer, storage_options=opts, work_dir=str(tmp_path / "w2"))
    for r in (again, other):
        assert (r["scored"], r["already_scored"], r["manifest_rows"]) == (0, 12, 12)
    assert url_manifest(opts) == local_scores

    # new photos in the bucket: ingest + annotate add them, scoring adds only their scores
    ingest_and_embed(opts, tmp_path, 15)
    before = url_manifest(opts)
    assert len(before) == 15 and {i: before[i] for i in local_scores} == local_scores  # ingest kept the merge
    more = score(URL, scorer=scorer, storage_options=opts, work_dir=str(tmp_path / "w2"))
    assert (more["scored"], more["already_scored"], more["manifest_rows"]) == (3, 12, 15)
    parts = url_quality_parts(opts, key, tmp_path / "from-url-2")
    assert parts.num_rows == 15 and len(annotations.list_parts(tmp_path / "from-url-2", "quality", key)) == 2
    scores = url_manifest(opts)
    assert scores == dict(zip(parts.column("id").to_pylist(), parts.column("score").to_pylist(), strict=True))
    assert {i: scores[i] for i in local_scores} == local_scores  # the first 12 keep their scores

    # no --scorer: the dataset's quality/scorer.safetensors at the URL, or one line saying what to pass
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli(["quality", "score", URL, "--work", str(tmp_path / "w3"), *endpoint])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and f"{URL}/quality/scorer.safetensors does not exist" in err[0]
        and "--scorer" in err[0]
    ), err
    fs_of(opts).put(str(scorer), f"{BUCKET}/ds/quality/scorer.safetensors")
    pulled = run_cli(capsys, URL, "--work", str(tmp_path / "w3"), *endpoint)
    assert (pulled["model_key"], pulled["scored"], pulled["already_scored"]) == (key, 0, 15)
    assert (tmp_path / "w3" / "quality" / "scorer.safetensors").read_bytes() == scorer.read_bytes()


@pytest.mark.parametrize(
    "args",
    [
        ["arena", URL],
        ["train", URL, "--clip", "builtin:image-stats"],
        ["rank", URL],
        ["fit-scorer", URL],
        ["export", URL, "ratings.parquet"],
        ["import", URL, "ratings.parquet"],
    ],
    ids=lambda a: a[0],
)
def test_other_quality_commands_need_a_local_dataset(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "ratings.parquet")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli(["quality", *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"`bigasp quality {args[0]}` needs a local dataset, not {URL}" in err[0]
    assert f"bigasp quality score {URL} --scorer" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ratings.parquet"]  # no 's3:' folder made
