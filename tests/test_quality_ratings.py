"""Ratings store: one row per judgement, undo, Parquet export/import, concurrent writers; labels."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import sys
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

from bigasp.errors import DataError
from bigasp.quality.ratings import Rating, RatingStore, labels


@pytest.fixture(params=["sqlite", "postgres"])
def new_db(request, tmp_path):
    """A factory of fresh, empty ratings databases: SQLite files, or PostgreSQL URLs on a real server."""
    if request.param == "sqlite":
        names = iter(range(100))
        return lambda: str(tmp_path / f"r{next(names)}.sqlite")
    server = request.getfixturevalue("postgres_server")
    return server.new_database


def _writer(path: str, rater: str, n: int) -> None:
    store = RatingStore(path)
    for k in range(n):
        store.add(f"a{k}", f"b{k}", ("left", "right", "tie")[k % 3], rater=rater)


def test_concurrent_writers_lose_nothing(new_db):
    path = new_db()
    RatingStore(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), f"rater{i}", 40)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = RatingStore(path)
    rows = store.all()
    assert len(rows) == 160
    assert len({r.id for r in rows}) == 160
    assert {r.rater for r in rows} == {f"rater{i}" for i in range(4)}
    assert all(r.source == "human" and r.created_at for r in rows)
    if store.dialect.name == "sqlite":
        with sqlite3.connect(path) as con:
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_add_undo_and_parameterised_sql(new_db):
    store = RatingStore(new_db())
    evil = "x'); DROP TABLE ratings; --"
    rid = store.add(evil, "b", "left", rater="ann")
    store.add("c", "d", "tie", rater="bob")
    assert store.all()[0].left_id == evil  # stored as data, not run
    assert not store.undo(rid, rater="bob")  # only your own judgement
    assert store.undo(rid, rater="ann")
    assert not store.undo(rid, rater="ann")
    assert [r.outcome for r in store.all()] == ["tie"]
    assert store.count() == 1 and store.count("bob") == 1 and store.count(evil) == 0
    assert store.rated_pairs() == {("c", "d")} and store.rated_images() == {"c", "d"}
    with pytest.raises(ValueError):
        store.add("a", "a", "left", rater="ann")
    with pytest.raises(ValueError):
        store.add("a", "b", "draw", rater="ann")


def test_export_import_roundtrip(new_db):
    a = RatingStore(new_db())
    a.add("x", "y", "left", rater="ann")
    a.add("y", "z", "tie", rater="bob", source="gpt4v2")
    table = a.export_table()
    b = RatingStore(new_db())
    assert b.import_table(table) == 2
    strip = [(r.left_id, r.right_id, r.outcome, r.rater, r.source, r.created_at) for r in b.all()]
    assert strip == [(r.left_id, r.right_id, r.outcome, r.rater, r.source, r.created_at) for r in a.all()]
    with pytest.raises(DataError, match="missing column"):
        b.import_table(table.drop_columns(["outcome"]))
    bad = table.set_column(2, "outcome", pa.array(["left", "draw"]))
    with pytest.raises(DataError, match="row 1"):
        b.import_table(bad)
    assert b.count() == 2  # all or nothing: the valid first row of the bad file was not added


def _r(left, right, outcome):
    return Rating(0, left, right, outcome, "r", "human", "")


def test_labels_average_all_judgements_of_a_pair():
    pairs = labels(
        [
            _r("a", "b", "left"),  # a > b
            _r("b", "a", "left"),  # b > a (same pair, other order)
            _r("c", "d", "tie"),
            _r("e", "f", "right"),
            _r("f", "e", "left"),
            _r("e", "f", "left"),
        ]
    )
    got = {
        (f, s): (float(p), int(v))
        for f, s, p, v in zip(pairs.first, pairs.second, pairs.p, pairs.votes, strict=True)
    }
    assert got[("a", "b")] == (0.5, 2)  # one win each way averages to a tie, as bigASP's skips did
    assert got[("c", "d")] == (0.5, 1)
    assert got[("e", "f")] == pytest.approx((1 / 3, 3))  # f > e twice, e > f once
    assert all(f < s for f, s in got)


def test_labels_weigh_a_tie_as_bigasp_stored_it():
    """bigASP's arena stored a tie as both orderings, (a, b) and (b, a), and its TrainClassifier
    notebook averaged the (1, 0) / (0, 1) rows of each pair: one win and one tie give 2/3."""
    judged = [("a", "b", "left"), ("a", "b", "tie"), ("c", "d", "tie"), ("d", "c", "left"),
              ("e", "f", "right"), ("f", "e", "tie"), ("e", "f", "tie"), ("g", "h", "left")]  # fmt: skip
    rows = []  # bigASP's quality_ratings table: (win_path, lose_path)
    for left, right, outcome in judged:
        if outcome == "tie":
            rows += [(left, right), (right, left)]
        else:
            rows.append((left, right) if outcome == "left" else (right, left))
    notebook = defaultdict(list)
    for win, lose in rows:
        p1, p2, rating = (win, lose, (1, 0)) if win < lose else (lose, win, (0, 1))
        notebook[(p1, p2)].append(rating)
    expected = {k: float(np.mean(v, axis=0)[0]) for k, v in notebook.items()}
    assert expected[("a", "b")] == pytest.approx(2 / 3)
    pairs = labels([_r(*j) for j in judged])
    got = {(f, s): float(p) for f, s, p in zip(pairs.first, pairs.second, pairs.p, strict=True)}
    assert got == pytest.approx(expected)
    assert dict(zip(zip(pairs.first, pairs.second, strict=True), pairs.votes.tolist(), strict=True)) == {
        ("a", "b"): 2, ("c", "d"): 2, ("e", "f"): 3, ("g", "h"): 1}  # fmt: skip


def test_postgres_url_errors_are_one_line(monkeypatch):
    url = "postgresql://ann:hunter2@127.0.0.1:1/ratings"
    with pytest.raises(DataError, match=r"cannot open the ratings database") as err:
        RatingStore(url, timeout=2)
    assert "hunter2" not in str(err.value) and "ann:***@127.0.0.1:1" in str(err.value)
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
    with pytest.raises(DataError, match=r"pip install 'bigasp\[postgres\]'"):
        RatingStore(url)


def test_postgres_raters_need_only_table_rights_and_pg_environment(postgres_server, monkeypatch):
    import psycopg

    owner_url = postgres_server.new_database()
    RatingStore(owner_url)  # the owner creates the table once
    with psycopg.connect(owner_url, autocommit=True) as con:
        con.execute("CREATE ROLE rater LOGIN")
        con.execute("GRANT SELECT, INSERT, DELETE ON ratings TO rater")
    database = owner_url.rsplit("/", 1)[1]
    # Credentials and address from libpq's PG* variables; the URL names only the database.
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    monkeypatch.setenv("PGPORT", str(postgres_server.port))
    monkeypatch.setenv("PGUSER", "rater")
    store = RatingStore(f"postgresql:///{database}")
    rid = store.add("a", "b", "left", rater="ann")
    store.add("b", "c", "tie", rater="ann")
    assert store.undo(rid, rater="ann")
    assert [(r.left_id, r.outcome, r.rater) for r in RatingStore(owner_url).all()] == [("b", "tie", "ann")]
    with psycopg.connect(f"postgresql:///{database}", autocommit=True) as con:
        assert con.execute("SELECT current_user").fetchone()[0] == "rater"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # why the store skips its schema
            con.execute("CREATE TABLE IF NOT EXISTS ratings (id INTEGER)")
