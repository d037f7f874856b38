"""The rating arena in a real browser (headless Chromium via Playwright) on a real waitress server,
plus its HTTP guard rails and pair selection."""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request

import numpy as np
import pytest

from bigasp.quality.arena import create_app, make_server, serving
from bigasp.quality.config import ArenaConfig
from bigasp.quality.pool import PairPicker, choose_pool
from bigasp.quality.ratings import RatingStore
from bigasp.quality.serve import build_arena
from quality_helpers import REPO, demo_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root, _, _ = demo_dataset(tmp_path_factory.mktemp("arena"), 12)
    return root


def _serve(arena):
    return serving(create_app(arena), threads=4, token=arena.token is not None)


@pytest.fixture(params=["sqlite", "postgres"])
def served(request, dataset, tmp_path):
    """The arena on a SQLite file, and on a real PostgreSQL server (the team option)."""
    if request.param == "sqlite":
        ratings = tmp_path / "ratings.sqlite"
    else:
        ratings = request.getfixturevalue("postgres_url")
    arena = build_arena(dataset, ArenaConfig(pool=12), ratings=ratings)
    with _serve(arena) as url:
        yield arena, url


def _rows(arena):
    return [(r.left_id, r.right_id, r.outcome, r.rater, r.source) for r in arena.store.all()]


def test_rate_by_click_and_keyboard_tie_undo_reload(served, page, tmp_path):
    arena, url = served
    page.goto(url)
    page.wait_for_function(
        "document.getElementById('left').complete && document.getElementById('left').naturalWidth > 0"
    )
    assert page.locator("#prediction").inner_text() == ""  # the model's opinion is hidden by default
    page.fill("#rater", "alice")
    page.locator("#rater").dispatch_event("change")

    shown = []

    def current():
        return page.evaluate("[pair.left.id, pair.right.id]")

    def rate(action, expect_status):
        page.wait_for_function("ready()")  # the page takes a judgement only once both images show
        shown.append(current())
        action()
        page.wait_for_function(
            f"document.getElementById('status').textContent === {json.dumps(expect_status)}"
        )
        page.wait_for_function(
            f"pair && (pair.left.id !== {json.dumps(shown[-1][0])} || pair.right.id !== {json.dumps(shown[-1][1])})"
        )

    rate(lambda: page.click("#left-frame"), "recorded: left better")  # click
    rate(lambda: page.keyboard.press("ArrowRight"), "recorded: right better")  # keyboard
    rate(lambda: page.keyboard.press(" "), "recorded: tie")  # space = tie
    assert [r[2] for r in _rows(arena)] == ["left", "right", "tie"]
    page.keyboard.press("z")  # undo the tie
    page.wait_for_function("document.getElementById('status').textContent === 'undone'")
    assert [r[2] for r in _rows(arena)] == ["left", "right"]

    page.reload()  # a reload shows a new pair and keeps the rater name
    page.wait_for_function("ready()")
    assert page.input_value("#rater") == "alice"
    page.click("#btn-undo")  # the new page has nothing of its own to undo
    page.wait_for_function("document.getElementById('status').textContent === 'nothing to undo'")
    rate(lambda: page.keyboard.press("ArrowLeft"), "recorded: left better")
    page.wait_for_function(
        "document.getElementById('right').complete && document.getElementById('right').naturalWidth > 0"
    )
    assert page.inner_text("#progress") == "ratings: 3 · yours: 3 · unrated pairs in pool (12 images): 63"

    rows = _rows(arena)
    assert rows == [
        (shown[0][0], shown[0][1], "left", "alice", "human"),
        (shown[1][0], shown[1][1], "right", "alice", "human"),
        (shown[3][0], shown[3][1], "left", "alice", "human"),
    ]
    # docs/quality-arena.png is this screenshot; BIGASP_UPDATE_DOCS=1 refreshes it.
    out = REPO / "docs" if os.environ.get("BIGASP_UPDATE_DOCS") else tmp_path
    page.screenshot(path=str(out / "quality-arena.png"))
    assert (out / "quality-arena.png").stat().st_size > 10_000


def _get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_only_pool_images_are_served_and_ratings_are_checked(served):
    arena, url = served
    status, body, headers = _get(f"{url}/image/0")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    for bad in (
        "/image/12",
        "/image/-1",
        "/image/..%2F..%2Fetc%2Fpasswd",
        "/images/etc/passwd",
        "/image/0/../../x",
    ):
        assert _get(url + bad)[0] == 404, bad
    a, b = arena.pool[0].id, arena.pool[1].id
    assert (
        _post(f"{url}/api/rate", {"left": a, "right": "/etc/passwd", "outcome": "left", "rater": "x"})[0]
        == 400
    )
    assert _post(f"{url}/api/rate", {"left": a, "right": a, "outcome": "left", "rater": "x"})[0] == 400
    assert _post(f"{url}/api/rate", {"left": a, "right": b, "outcome": "win", "rater": "x"})[0] == 400
    assert _post(f"{url}/api/rate", {"left": a, "right": b, "outcome": "left", "rater": ""})[0] == 400
    status, out = _post(f"{url}/api/rate", {"left": a, "right": b, "outcome": "left", "rater": "x"})
    assert status == 200 and out["progress"]["mine"] == 1
    assert out["progress"]["pairs_left"] == 12 * 11 // 2 - 1


def test_token_guards_every_route(dataset, tmp_path, caplog):
    arena = build_arena(dataset, ArenaConfig(pool=12), ratings=tmp_path / "r.sqlite", token="s3cret")
    with _serve(arena) as url:
        assert _get(f"{url}/")[0] == 403
        assert _get(f"{url}/image/0")[0] == 403
        assert _get(f"{url}/?token=wrong")[0] == 403
        status, _, headers = _get(f"{url}/?token=s3cret")
        assert status == 200 and "bigasp_arena_token=s3cret" in headers["Set-Cookie"]
        assert _get(f"{url}/image/0", {"Cookie": "bigasp_arena_token=s3cret"})[0] == 200
        assert _get(f"{url}/api/progress", {"X-Arena-Token": "s3cret"})[0] == 200
    with caplog.at_level(logging.WARNING):
        make_server(create_app(arena), "0.0.0.0", 0, token=False).close()
    assert "--token" in caplog.text


def test_pool_keeps_rated_images_and_tops_up_by_keyed_hash():
    cands = [f"i{k:03d}" for k in range(100)]
    pool = choose_pool(cands, {"i050", "zzz"}, 10, seed=0)
    assert len(pool) == 10 and "i050" in pool and "zzz" not in pool
    assert pool == choose_pool(cands, {"i050"}, 10, seed=0)
    assert pool != choose_pool(cands, {"i050"}, 10, seed=1)


def test_uncertain_and_flagged_pair_modes(tmp_path):
    store = RatingStore(tmp_path / "r.sqlite")
    ids = [f"i{k}" for k in range(20)]
    strength = np.arange(20, dtype=float)

    def judge(first, second):  # a real, deterministic model of P(first better)
        return 1 / (1 + np.exp(-(strength[first] - strength[second])))

    picker = PairPicker(20, store, ids, judge=judge, candidates=64)
    i, j = picker.pick("uncertain")
    assert abs(i - j) == 1  # the closest call among the candidates: neighbours in strength
    flagged = np.zeros(20, bool)
    flagged[[0, 15]] = True  # image 0 is weakest (the model is sure it loses); 15 is strong
    picker = PairPicker(20, store, ids, judge=judge, flagged=flagged, candidates=200, flagged_confidence=0.9)
    for _ in range(20):
        i, j = picker.pick("flagged")
        assert flagged[i] != flagged[j]
        f, o = (i, j) if flagged[i] else (j, i)
        assert 1 - judge(np.array([f]), np.array([o]))[0] < 0.9
    store.add(ids[0], ids[1], "left", rater="r")
    assert picker.rated_in_pool(store.rated_pairs()) == 1


def test_pairs_left_counts_only_pairs_of_readable_images(tmp_path):
    """An image that failed to load leaves the count of pairs a rater can still judge, with its
    rated pairs: 5 images (10 pairs), one rated, then one of its images unreadable -> 4 images, 6 pairs."""
    store = RatingStore(tmp_path / "r.sqlite")
    ids = [f"i{k}" for k in range(5)]
    picker = PairPicker(5, store, ids)
    store.add(ids[0], ids[1], "left", rater="r")
    assert picker.total_pairs() - picker.rated_in_pool(store.rated_pairs()) == 9
    picker.exclude(1)
    assert picker.total_pairs() == 6 and picker.rated_in_pool(store.rated_pairs()) == 0
    seen = {frozenset(picker.pick()) for _ in range(40)}
    assert all(1 not in pair for pair in seen)
