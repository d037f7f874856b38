"""`bigasp dataset report`: counts on a hand-made manifest, n-gram accuracy bound, HTML in Chromium."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from bigasp.report import ReportOptions, collect
from bigasp.report.ngrams import NgramCounter, caption_words
from bigasp.store import layout
from bigasp.store.annotations import write_part
from bigasp.store.manifest import MANIFEST_SCHEMA, REJECTS_SCHEMA, conform, init_dataset

LONG = " ".join(["a red bicycle leans on a brick wall"] * 14)  # > 75 CLIP tokens: 2 chunks
ROWS = [
    # id, size (w, h), score, tags, captions, source, watermark, caption type
    ("r0", (1216, 832), 7, ["long_hair", "1girl", "smile"], ["A woman smiles. A woman smiles!"], "reddit", True, "Descriptive"),
    ("r1", (832, 1216), 3, ["longhair", "smile"], ["a woman smiles"], "flickr", False, None),
    ("r2", (1024, 1024), None, [], [], None, None, None),
    ("r3", (2048, 2048), 0, ["1girl", "smile"], ["The cat, the cat.", "Second caption here"], "reddit", None, "MidJourney"),
    ("r4", (1280, 720), 9, ["Long Hair"], [LONG], "reddit", False, None),
]  # fmt: skip
ALIASES = [
    {"antecedent_name": "longhair", "consequent_name": "long_hair", "status": "active"},
    {"antecedent_name": "smiling", "consequent_name": "smile", "status": "active"},
    {"antecedent_name": "1girl", "consequent_name": "solo_female", "status": "deleted"},
]


def make_dataset(root: Path) -> Path:
    init_dataset(root)
    table = pa.table(
        {
            "id": [r[0] for r in ROWS],
            "width": pa.array([r[1][0] for r in ROWS], pa.int32()),
            "height": pa.array([r[1][1] for r in ROWS], pa.int32()),
            "score": pa.array([r[2] for r in ROWS], pa.int8()),
            "tags": [r[3] for r in ROWS],
            "captions": [r[4] for r in ROWS],
            "source": [r[5] for r in ROWS],
            "watermark": [r[6] for r in ROWS],
            "extra": [json.dumps({"caption_type": r[7]}) if r[7] else "{}" for r in ROWS],
        }
    )
    layout.atomic_write_parquet(conform(table, MANIFEST_SCHEMA), root / layout.MANIFEST)
    rejects = pa.table({"path": ["a", "b", "c"], "reason": ["too_small", "too_small", "duplicate"],
                        "stage": ["ingest"] * 3})  # fmt: skip
    layout.atomic_write_parquet(conform(rejects, REJECTS_SCHEMA), root / layout.REJECTS)
    ids = pa.table({"id": ["r0", "r1", "r1", "zz"]})  # a duplicate and an id not in the manifest
    write_part(root, "tags", "joytag", ids, session="s", rank=0, seq=0, provenance={})
    write_part(root, "embed", "clip-b32", pa.table({"id": ["r3"]}), session="s", rank=0, seq=0, provenance={})
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("report") / "ds")


@pytest.fixture(scope="module")
def alias_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("aliases") / "tag_aliases.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ALIASES))
    return p


@pytest.fixture(scope="module")
def report(dataset, alias_file):
    from bigasp.text.aliases import AliasTable

    return collect(str(dataset), ReportOptions(progress=False), aliases=AliasTable.load(alias_file))


def test_tag_counts_raw_and_folded(report):
    assert report.tags_raw == Counter({"smile": 3, "1girl": 2, "long_hair": 1, "longhair": 1, "Long Hair": 1})
    # longhair is an active alias of long_hair; "Long Hair" is the same tag once normalised; the
    # deleted alias 1girl -> solo_female is ignored
    assert report.tags_folded == Counter({"smile": 3, "long_hair": 3, "1girl": 2})
    assert report.tag_canonical["longhair"] == "long_hair"
    assert report.tags_per_image.tolist()[:4] == [1, 1, 2, 1]
    i = {t: k for k, t in enumerate(report.cooc_tags)}
    assert report.cooc[i["smile"], i["1girl"]] == 2
    assert report.cooc[i["smile"], i["smile"]] == 3
    assert report.cooc[i["longhair"], i["1girl"]] == 0


def test_ngram_counts(report):
    grams = {n: {g: c for g, c, _ in rows} for n, rows in report.ngrams.items()}
    assert grams[1] == {"a": 3 + 28, "woman": 3, "smiles": 3, "the": 2, "cat": 2, "second": 1, "caption": 1,
                        "here": 1, "red": 14, "bicycle": 14, "leans": 14, "on": 14, "brick": 14, "wall": 14}  # fmt: skip
    assert grams[2]["a woman"] == 3
    assert grams[2]["woman smiles"] == 3
    assert grams[2]["smiles a"] == 1
    assert grams[2]["the cat"] == 2
    assert "cat second" not in grams[2]  # n-grams never cross from one caption into the next
    assert grams[3]["a woman smiles"] == 3
    assert grams[6]["a woman smiles a woman smiles"] == 1
    assert grams[7]["a red bicycle leans on a brick"] == 14
    assert all(u == 0 for rows in report.ngrams.values() for _, _, u in rows)  # everything fitted: exact
    assert report.words_per_caption[[6, 3, 4, 112]].tolist() == [1, 2, 1, 1]


def test_distributions(report, dataset):
    from bigasp.buckets import SDXL_BUCKETS, BucketSet

    assert report.rows == report.rows_total == 5
    assert report.score.tolist() == [1, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1]  # unscored, 0, 3, 7, 9
    bset = BucketSet(SDXL_BUCKETS)
    want = Counter(bset.nearest(h, w).name for _, (w, h), *_ in ROWS)
    got = {n: int(c) for n, c in zip(report.bucket_names, report.bucket_counts, strict=True) if c}
    assert got == want
    k = report.bucket_names.index(bset.nearest(832, 1216).name)
    assert report.score_by_bucket[k].tolist() == [0] * 8 + [1, 0, 0]  # r0: score 7 in 1216x832
    assert report.sources == Counter({"reddit": 3, "flickr": 1, "(none)": 1})
    assert report.caption_types == Counter({"Descriptive": 1, "MidJourney": 1, "(none)": 3})
    assert report.watermark == {"true": 1, "false": 2, "unknown": 2}
    assert report.captions_per_image.tolist()[:3] == [1, 3, 1]
    assert report.rejects == Counter({"ingest:too_small": 2, "ingest:duplicate": 1})
    cov = {(a["stage"], a["model"]): (a["images"], a["unknown_ids"]) for a in report.annotations}
    assert cov == {("tags", "joytag"): (2, 1), ("embed", "clip-b32"): (1, 0)}


def test_token_and_chunk_estimates_match_training(report, dataset):
    """The report's chunk counts are the training sampler's estimate, and its CLIP token counts
    are the shipped Hugging Face tokenizer's."""
    from bigasp.store.manifest import read_manifest
    from bigasp.text.tokenizer import tokenize_reference
    from bigasp.train.data import DataConfig, row_chunk_estimates

    table = read_manifest(*layout.url_to_fs(str(dataset)))
    chunks = Counter(row_chunk_estimates(table, DataConfig()).tolist())
    assert report.chunk_estimate == chunks
    assert set(chunks) == {1, 2}  # the long caption needs a second chunk
    caps = [c for r in ROWS for c in r[4]]
    lengths = Counter(len(ids) for ids in tokenize_reference(caps))
    assert {int(k): int(v) for k, v in enumerate(report.clip_tokens) if v} == dict(lengths)
    assert report.clip_chunks == Counter({1: 4, 2: 1})


def test_sample(dataset):
    rep = collect(str(dataset), ReportOptions(progress=False, sample=2, seed=1))
    assert rep.rows == 2 and rep.sampled and rep.rows_total == 5
    assert rep.score.sum() == 2


def test_caption_words_rules():
    words, doc, per = caption_words(pa.array(["Woman's 'close-up'! rock'n'roll", None, "ÉCOLE—naïve “x”"]))
    assert words.to_pylist() == ["woman's", "close", "up", "rock'n'roll", "école", "naïve", "x"]
    assert doc.tolist() == [0, 0, 0, 0, 2, 2, 2]
    assert per.tolist() == [4, 0, 3]


def test_ngram_counter_bounded_memory_is_within_its_bound():
    """With a tiny capacity the counts are approximate; each must lie in [true - bound, true]."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(30)]
    captions = [
        " ".join(vocab[j] for j in (rng.zipf(1.5, rng.integers(3, 12)) - 1) % 30) for _ in range(3000)
    ]
    exact = {n: Counter() for n in range(1, 5)}
    for c in captions:
        w = c.split()
        for n in exact:
            exact[n].update(" ".join(w[i : i + n]) for i in range(len(w) - n + 1))
    counter = NgramCounter(max_n=4, capacity=200, step_words=2000)
    for s in range(0, len(captions), 500):
        counter.add_captions(pa.array(captions[s : s + 500]))
    for n in range(1, 5):
        top = counter.top(n, 20)
        assert len(top) == 20
        for gram, count, bound in top:
            assert exact[n][gram] - bound <= count <= exact[n][gram], (n, gram)
        if n == 1:
            assert [c for _, c, _ in top] == [c for _, c in exact[1].most_common(20)]
    assert counter.cands[4].max_undercount > 0  # the bound is real: memory was exceeded


def test_noun_chunks_needs_spacy(dataset):
    import importlib.util

    from bigasp.errors import BigaspError

    if importlib.util.find_spec("spacy") is not None:
        pytest.skip("spaCy is installed here; the error path needs it absent")
    with pytest.raises(BigaspError, match="spaCy"):
        collect(str(dataset), ReportOptions(progress=False, noun_chunks=True))


def test_cli_writes_report_and_html_renders(dataset, alias_file, tmp_path, page):
    from bigasp.cli import main
    from bigasp.report.plots import PLOTS

    out = tmp_path / "report"
    main(
        ["dataset", "report", str(dataset), "--out", str(out), "--aliases", str(alias_file), "--no-progress"]
    )
    with open(out / "tags.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0] == {"tag": "smile", "count": "3", "canonical": "smile", "folded_count": "3"}
    by_tag = {r["tag"]: r for r in rows}
    assert by_tag["longhair"]["canonical"] == "long_hair" and by_tag["longhair"]["folded_count"] == "3"
    with open(out / "ngrams.csv") as f:
        grams = list(csv.DictReader(f))
    tri = {g["ngram"]: g for g in grams if g["n"] == "3"}
    assert tri["a woman smiles"]["count"] == "3" and tri["a woman smiles"]["max_undercount"] == "0"
    assert [g["ngram"] for g in grams if g["n"] == "1"][:2] == ["a", "bicycle"]  # count, then text
    for name, _, _ in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    page.goto((out / "index.html").as_uri())
    page.wait_for_load_state("load")
    imgs = page.eval_on_selector_all(
        "img", "els => els.map(e => ({w: e.naturalWidth, h: e.naturalHeight, done: e.complete}))"
    )
    assert len(imgs) == len(PLOTS)
    assert all(i["done"] and i["w"] > 0 and i["h"] > 0 for i in imgs), imgs
    text = page.inner_text("body")
    assert "long_hair" in text and "a woman smiles" in text and "ingest:too_small" in text


def test_default_alias_table_is_the_shipped_danbooru_one(dataset, tmp_path):
    """Without --aliases or --config the report folds with the table the bigASP recipes train with."""
    from bigasp.cli import main

    def tags_csv(*extra: str) -> dict[str, dict[str, str]]:
        out = tmp_path / f"r{len(extra)}"
        main(["dataset", "report", str(dataset), "--out", str(out), "--no-ngrams", "--token-sample", "0",
              "--no-progress", *extra])  # fmt: skip
        with open(out / "tags.csv") as f:
            return {r["tag"]: r for r in csv.DictReader(f)}

    assert tags_csv()["longhair"]["canonical"] == "long_hair"  # an alias of the shipped table
    assert tags_csv("--aliases", "none")["longhair"]["canonical"] == "longhair"


def test_bench_report_runs(tmp_path):
    """`bigasp bench report` on a small synthetic manifest: JSON fields, realistic captions and tags."""
    from bigasp.cli import main

    out = tmp_path / "bench.json"
    main(["bench", "report", "--rows", "3000", "--keep", str(tmp_path / "ds"), "--json", str(out)])
    m = json.loads(out.read_text())["metrics"]
    assert m["rows"] == 3000 and 3000 < m["captions"] < 4200  # 1-2 captions per image
    assert m["columnar_s"] > 0 and m["captions_per_cpu_s"] > 0 and m["peak_rss_gib"] > 0
    rep = collect(str(tmp_path / "ds"), ReportOptions(progress=False, ngrams=False, token_sample=0))
    words = rep.words_per_caption
    mean_words = (words * np.arange(len(words))).sum() / words.sum()
    assert 35 < mean_words < 60  # JoyCaption's requested lengths: N(45, 30) rounded up to tens, 20..170
    tags = rep.tags_per_image
    assert 28 < (tags * np.arange(len(tags))).sum() / tags.sum() < 38  # v1 card: 32 ± 19.8
    assert rep.annotations[0]["stage"] == "tags" and 0.4 < rep.annotations[0]["share"] < 0.6


def test_token_estimate_for_rows_missing_from_an_n_tokens_column():
    """A dataset with an `n_tokens` column that lacks a value for some rows: those rows are
    estimated as rows of a dataset without the column are (a tag-only row from its tags, a
    captioned one from its caption bytes), not as 0 tokens (one chunk)."""
    from bigasp.train.data import DataConfig, row_chunk_estimates, row_token_estimates

    tags = [f"tag_{i}" for i in range(60)]
    table = pa.table(
        {
            "captions": [[], ["a woman smiles"], [LONG], [], [LONG]],
            "tags": [tags, ["smile"], [], tags[:4], []],
            "n_tokens": pa.array([None, 4, None, 9, None], pa.int32()),
        }
    )
    cfg = DataConfig()
    without = row_token_estimates(table.drop_columns(["n_tokens"]), cfg.prompt)
    est = row_token_estimates(table, cfg.prompt)
    assert est.tolist() == [without[0], 4, without[2], 9, without[4]]
    assert est[0] == round(32 * 2.5)  # min(#tags, tag_count_mean) x tokens_per_tag: 80 tokens
    assert row_chunk_estimates(table, cfg, est).tolist()[0] == 2  # 80 + quality tokens > 75
    # the per-caption (list) form: a null list or a list of nulls falls back; nulls are skipped
    lists = table.set_column(
        2, "n_tokens", pa.array([None, [4, None], [None], [9], [None, None]], pa.list_(pa.int32()))
    )
    assert row_token_estimates(lists, cfg.prompt).tolist() == est.tolist()


def test_docs_state_the_default_empty_prompt_rate():
    """Every place the docs state the default empty-prompt (UCG) rate says the shipped default
    (5%, bigASP v2's data.py), not the 10% of bigASP v1 / v2's unread config value."""
    import re

    from bigasp.text.synthesis import PromptConfig

    rate = PromptConfig().ucg_rate
    assert rate == 0.05
    docs = Path(__file__).resolve().parents[1] / "docs"
    claims = []
    for md in sorted(docs.glob("*.md")):
        text = md.read_text()
        claims += [(md.name, float(p) / 100) for p in re.findall(r"UCG empties (\d+)% of prompts", text)]
        claims += [(md.name, float(v)) for v in re.findall(r"`data\.prompt\.ucg_rate` \((0\.\d+)", text)]
    assert {"data-loading.md", "coming-from-kohya.md"} <= {name for name, _ in claims}
    assert all(v == rate for _, v in claims), claims


def test_cli_csv_cells_that_a_spreadsheet_would_run_are_quoted(tmp_path):
    """Tags from scraped sidecars that start with = + - @ tab or CR would run as formulas when
    tags.csv is opened in a spreadsheet (OWASP CSV injection): the installed `bigasp dataset
    report` writes them with a leading single quote; a stored leading quote gets one more.
    (Its caption pass runs in two worker processes here.)"""
    import os
    import subprocess
    import sys

    evil = ['=HYPERLINK("http://x","y")', "+1+cmd", "-_-", "@SUM(A1)", "\tx", "\rx", "'quoted", "plain"]
    root = tmp_path / "ds"
    init_dataset(root)
    table = pa.table(
        {
            "id": [f"e{i}" for i in range(len(evil))],
            "width": pa.array([1024] * len(evil), pa.int32()),
            "height": pa.array([1024] * len(evil), pa.int32()),
            "tags": [[t] for t in evil],
            "captions": [["=1+2 a cat"]] * len(evil),
        }
    )
    layout.atomic_write_parquet(conform(table, MANIFEST_SCHEMA), root / layout.MANIFEST)
    bigasp = Path(sys.executable).with_name("bigasp")
    out = tmp_path / "report"
    cmd = [str(bigasp), "dataset", "report", str(root), "--out", str(out), "--aliases", "none",
           "--token-sample", "0", "--no-progress", "--workers", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    for name, col in (("tags.csv", "tag"), ("tags-folded.csv", "tag"), ("ngrams.csv", "ngram")):
        with open(out / name, newline="") as f:
            cells = [v for r in csv.DictReader(f) for k, v in r.items() if k in (col, "canonical")]
        assert cells, name
        assert not [c for c in cells if c.startswith(("=", "+", "-", "@", "\t", "\r"))], (name, cells)
    with open(out / "tags.csv", newline="") as f:
        got = {r["tag"] for r in csv.DictReader(f)}
    assert got == {"'" + t for t in evil if t != "plain"} | {"plain"}


def _captions_dataset(root: Path, rows: int, groups: int) -> Path:
    """`rows` images with 1-2 Zipf-worded captions each, written in `groups` row groups."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    vocab = [f"w{i}" for i in range(40)] + ["the", "a", "of", "woman's"]
    caps = [[" ".join(vocab[j] for j in (rng.zipf(1.4, rng.integers(2, 14)) - 1) % len(vocab))
             for _ in range(int(rng.integers(1, 3)))] for _ in range(rows)]  # fmt: skip
    init_dataset(root)
    table = conform(
        pa.table({"id": [f"c{i:05d}" for i in range(rows)], "captions": caps,
                  "width": pa.array([1024] * rows, pa.int32()), "height": pa.array([1024] * rows, pa.int32())}),
        MANIFEST_SCHEMA,
    )  # fmt: skip
    pq.write_table(table, root / layout.MANIFEST, row_group_size=-(-rows // groups))
    return root


@pytest.mark.parametrize("groups", [1, 7])
def test_caption_pass_in_worker_processes_counts_what_one_process_counts(tmp_path, groups):
    """The caption pass split over worker processes (row ranges inside one row group, or whole
    row groups) gives the single-process words, CLIP token counts and exact n-gram counts."""
    root = _captions_dataset(tmp_path / "ds", 3000, groups)
    base = dict(progress=False, token_sample=10**6, batch_rows=500)
    one = collect(str(root), ReportOptions(workers=1, **base))
    three = collect(str(root), ReportOptions(workers=3, **base))
    assert one.caption_workers == 1 and three.caption_workers == 3 and len(three.worker_peak_rss_gib) >= 1
    assert one.words_per_caption.tolist() == three.words_per_caption.tolist()
    assert one.clip_tokens.tolist() == three.clip_tokens.tolist() and three.clip_tokenized == one.captions
    assert one.clip_chunks == three.clip_chunks
    for n in range(1, 8):
        assert one.ngrams[n] == three.ngrams[n], n
    assert three.cpu_seconds["captions"] > 0
    sample = collect(str(root), ReportOptions(workers=2, sample=700, **base))
    assert sample.rows == 700 and sample.words_per_caption.sum() == sample.captions


def test_ngram_bound_holds_for_counters_merged_from_workers():
    """Counters of disjoint caption shares, each over its memory, merged: every kept count lies
    in [true - bound, true] with the summed bound (what the worker processes rely on)."""
    rng = np.random.default_rng(1)
    vocab = [f"w{i}" for i in range(30)]
    captions = [
        " ".join(vocab[j] for j in (rng.zipf(1.5, rng.integers(3, 12)) - 1) % 30) for _ in range(4000)
    ]
    exact = {n: Counter() for n in range(1, 5)}
    for c in captions:
        w = c.split()
        for n in exact:
            exact[n].update(" ".join(w[i : i + n]) for i in range(len(w) - n + 1))
    shares = []
    for k in range(3):
        counter = NgramCounter(max_n=4, capacity=200, step_words=2000)
        for s in range(k * 500, len(captions), 1500):
            counter.add_captions(pa.array(captions[s : s + 500]))
        shares.append(counter)
    merged = shares[0]
    for other in shares[1:]:
        merged.merge(other)
    assert merged.captions == len(captions)
    for n in range(1, 5):
        top = merged.top(n, 20)
        assert len(top) == 20
        for gram, count, bound in top:
            assert exact[n][gram] - bound <= count <= exact[n][gram], (n, gram, count, bound)
        if n == 1:
            assert [c for _, c, _ in top] == [c for _, c in exact[1].most_common(20)]
    assert merged.cands[4].max_undercount > max(s.cands[4].max_undercount for s in shares[1:]) > 0


def _reference_words(caption: str | None) -> list[str]:
    """The documented word rule, one character at a time in plain Python: lower case; letters
    and digits (any script) make words; an apostrophe stays only between two of them."""
    if caption is None:
        return []
    s = caption.lower()
    words, cur = [], []
    for i, ch in enumerate(s):
        inner = ch == "'" and 0 < i < len(s) - 1 and s[i - 1].isalnum() and s[i + 1].isalnum()
        if ch.isalnum() or inner:
            cur.append(ch)
        elif cur:
            words.append("".join(cur))
            cur = []
    if cur:
        words.append("".join(cur))
    return words


def _varied_captions(rng: np.random.Generator, count: int) -> list[str | None]:
    """Captions from a small vocabulary (so n-grams repeat) with mixed case, apostrophes at word
    edges and inside, non-ASCII words and punctuation, odd separators, empty and null ones."""
    vocab = ["a", "The", "woman", "WOMAN'S", "rock'n'roll", "close", "up", "x2", "42", "don't",
             "'quoted'", "it's'", "''", "Straße", "naïve", "École", "Привет", "東京", "Αθήνα", "٣"]  # fmt: skip
    seps = [" ", " ", " ", ", ", ". ", "—", " “", "” ", "\t", "\n", "-", "'", " 🙂 ", "!?", "  "]
    out: list[str | None] = []
    for _ in range(count):
        r = rng.random()
        if r < 0.02:
            out.append(None)
        elif r < 0.04:
            out.append(rng.choice(["", " ", "...", "'", "🙂"]))
        else:
            k = int(rng.integers(1, 16))
            words = [vocab[j] for j in (rng.zipf(1.3, k) - 1) % len(vocab)]
            text = "".join(w + seps[int(rng.integers(len(seps)))] for w in words)
            out.append(text if rng.random() < 0.5 else text.rstrip())
    return out


@pytest.mark.parametrize("capacity", [100_000, 40])
def test_counts_match_a_plain_python_reference(capacity):
    """Words, exact unigram counts and n-gram counts (n = 2..7) against `collections.Counter`
    over a character-by-character tokenisation of the same rule, on varied captions in several
    batches: exact when the candidates fit, within [true - max_undercount, true] when not."""
    captions = _varied_captions(np.random.default_rng(7), 3000)
    exact = {n: Counter() for n in range(1, 8)}
    ref_words = [_reference_words(c) for c in captions]
    for w in ref_words:
        for n in exact:
            exact[n].update(" ".join(w[i : i + n]) for i in range(len(w) - n + 1))
    counter = NgramCounter(max_n=7, capacity=capacity, step_words=1500)
    for s in range(0, len(captions), 700):
        batch = pa.array(captions[s : s + 700], pa.string())
        words, doc, per = caption_words(batch)
        want = ref_words[s : s + 700]
        assert per.tolist() == [len(w) for w in want]
        assert words.to_pylist() == [x for w in want for x in w]
        assert doc.tolist() == [i for i, w in enumerate(want) for _ in w]
        counter.add_captions(batch)
    assert counter.total_words == sum(len(w) for w in ref_words)
    top1 = counter.top(1, 10**6)
    assert top1 == sorted(((g, c, 0) for g, c in exact[1].items()), key=lambda r: (-r[1], r[0]))
    for n in range(2, 8):
        top = counter.top(n, 50)
        assert top or capacity < 100_000, n  # a tiny capacity may keep no 7-gram at all
        bound = counter.cands[n].max_undercount
        for gram, count, undercount in top:
            assert undercount == bound
            assert exact[n][gram] - bound <= count <= exact[n][gram], (n, gram, count, bound)
        if capacity == 100_000:  # everything fitted: exact, and the same top list
            assert bound == 0
            want = sorted(exact[n].items(), key=lambda r: (-r[1], r[0]))[:50]
            assert [(g, c) for g, c, _ in top] == want, n
    if capacity == 40:
        assert counter.cands[2].max_undercount > 0 and counter.top(4, 50)  # the bound was exercised
