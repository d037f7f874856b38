"""The arena's guard rails against what a browser or a script can send it, on a real waitress server:
the Host check (DNS rebinding), undo bound to a secret, the body cap, malformed JSON bodies, and a
pool image deleted after ingest (a 404 on the server; in a real browser, no judgement of that pair)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bigasp.quality.arena import HostPolicy, create_app, serving
from bigasp.quality.config import ArenaConfig
from bigasp.quality.serve import build_arena
from hold_helpers import ctrl_c_as_in_a_terminal
from quality_helpers import photo_dataset

BIGASP = Path(sys.executable).with_name("bigasp")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return photo_dataset(tmp_path_factory.mktemp("arena-guards"), 6)


@pytest.fixture
def served(dataset, tmp_path):
    arena = build_arena(dataset, ArenaConfig(pool=6), ratings=tmp_path / "ratings.sqlite")
    with serving(create_app(arena), threads=2) as url:
        yield arena, url


def _request(url, data=None, headers=None):
    req = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url, body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, out = _request(url, raw)
    return status, json.loads(out)


def test_host_policy_names():
    local = HostPolicy("127.0.0.1")
    for ok in ("localhost", "LOCALHOST:5034", "127.0.0.1:5034", "127.0.0.2", "[::1]:5034", "localhost."):
        assert local.allows(ok), ok
    for bad in ("evil.example", "evil.example:5034", "127.0.0.1.evil.example", "192.168.1.5:5034", "", None):
        assert not local.allows(bad), bad
    lan = HostPolicy("10.0.0.2", ("arena.lan",))
    assert lan.allows("10.0.0.2:5034") and lan.allows("Arena.LAN:5034") and not lan.allows("10.0.0.3")
    anywhere = HostPolicy("0.0.0.0")  # reached by this machine's addresses, never by a foreign name
    assert anywhere.allows("192.168.1.5:5034") and anywhere.allows("[fe80::1]:80")
    assert not anywhere.allows("rebind.evil.example:5034")


def test_requests_for_a_foreign_host_name_are_refused(served):
    arena, url = served
    port = url.rsplit(":", 1)[1]
    for name in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.example:{port}"):
        for path in ("/", "/api/pair", "/image/0"):
            status, body = _request(url + path, headers={"Host": name})
            assert status == 403 and b"--allow-host" in body, (name, path, status)
    status, body = _request(f"{url}/api/rate", b"{}", {"Host": "evil.example"})
    assert status == 403  # a write as well
    for name in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert _request(f"{url}/api/pair", headers={"Host": name})[0] == 200, name
    arena.hosts = HostPolicy("127.0.0.1", ("arena.lan",))
    assert _request(f"{url}/api/pair", headers={"Host": f"arena.lan:{port}"})[0] == 200
    assert _request(f"{url}/api/pair", headers={"Host": "evil.example"})[0] == 403


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_allow_host_option_of_the_installed_command(dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [str(BIGASP), "quality", "arena", str(dataset), "--port", "0", "--allow-host", "arena.lan",
           "--ratings", str(tmp_path / "r.sqlite")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=ctrl_c_as_in_a_terminal)  # fmt: skip
    try:
        url = None
        for line in proc.stdout:  # blocks until the server has bound its port and says where
            m = re.search(r"open (http://\S+?)/ ", line)
            if m:
                url = m.group(1)
                break
        assert url, proc.stderr.read()
        assert _request(f"{url}/api/pair", headers={"Host": "arena.lan"})[0] == 200
        assert _request(f"{url}/api/pair", headers={"Host": "evil.example"})[0] == 403
        assert _request(f"{url}/api/pair")[0] == 200  # 127.0.0.1:PORT, the --host address
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def test_undo_needs_the_secret_returned_with_the_rating(served):
    arena, url = served
    a, b, c = (p.id for p in arena.pool[:3])
    status, mine = _post(f"{url}/api/rate", {"left": a, "right": b, "outcome": "left", "rater": "alice"})
    assert status == 200 and len(mine["undo_token"]) >= 32
    _, bobs = _post(f"{url}/api/rate", {"left": a, "right": c, "outcome": "right", "rater": "bob"})
    rid = mine["rating_id"]
    for forged in (
        {"rating_id": rid, "rater": "alice"},  # the name alone no longer undoes
        {"rating_id": rid, "rater": "alice", "undo_token": bobs["undo_token"]},  # bob's own secret
        {"rating_id": rid, "rater": "bob", "undo_token": mine["undo_token"]},  # alice's secret, another name
        {"rating_id": rid, "rater": "alice", "undo_token": "0" * 32},
    ):
        status, out = _post(f"{url}/api/undo", forged)
        assert status == 403 and "undo_token" in out["error"], forged
    assert arena.store.count() == 2
    ok = {"rating_id": rid, "rater": "alice", "undo_token": mine["undo_token"]}
    assert _post(f"{url}/api/undo", ok) == (200, {"undone": True, "progress": arena.progress("alice")})
    assert [r.rater for r in arena.store.all()] == ["bob"]
    assert _post(f"{url}/api/undo", ok)[1]["undone"] is False  # once


def test_request_bodies_are_capped(served):
    _, url = served
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        # Announces 300 MB and sends 1 KiB: refused from the headers, not after reading the body.
        s.sendall(
            b"POST /api/rate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 300000000\r\n\r\n" + b"x" * 1024
        )
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    # Behind another WSGI server (or a chunked body with no length), the app's own cap answers.
    arena, _ = served
    resp = (
        create_app(arena).test_client().post("/api/rate", data=b"x" * 70_000, content_type="application/json")
    )
    assert resp.status_code == 413 and "64 KiB" in resp.get_json()["error"]


MALFORMED = [
    b"[1, 2]",
    b'"left"',
    b"null",
    b"17",
    b"{",
    b"\xff\xfe{}",
    b"[" * 30_000,  # deeper than the JSON parser's recursion limit, inside the body cap
    b'{"a": ' * 10_000,
]


@pytest.mark.parametrize("path", ["/api/rate", "/api/undo"])
def test_malformed_bodies_are_400_with_a_message(served, path):
    _, url = served
    for raw in MALFORMED:
        status, out = _post(url + path, raw)
        assert status == 400 and "JSON object" in out["error"], (raw[:20], status, out)


def test_wrong_types_in_the_body_are_400_with_a_message(served):
    arena, url = served
    a, b = arena.pool[0].id, arena.pool[1].id
    good = {"left": a, "right": b, "outcome": "left", "rater": "x"}
    for change in (
        {"left": [a]},
        {"left": {"id": a}},
        {"right": 3},
        {"outcome": ["left"]},
        {"outcome": {"left": 1}},
        {"rater": ["x"]},
        {"rater": 2**70},
    ):
        status, out = _post(f"{url}/api/rate", {**good, **change})
        assert status == 400 and out["error"], change
    for rid in (2**70, -1, 0, True, [1], 1.5, "1", None):
        status, out = _post(f"{url}/api/undo", {"rating_id": rid, "rater": "x", "undo_token": "t"})
        assert status == 400 and "rating_id" in out["error"], rid
    assert arena.store.count() == 0


def test_a_pool_image_deleted_after_ingest_is_a_404_and_left_out_of_pairs(dataset, tmp_path):
    root = photo_dataset(tmp_path, 4)
    arena = build_arena(root, ArenaConfig(pool=4), ratings=tmp_path / "r.sqlite")
    Path(arena.pool[2].ref.file).unlink()
    with serving(create_app(arena), threads=2) as url:
        assert _request(f"{url}/image/1")[0] == 200
        status, body = _request(f"{url}/image/2")
        assert status == 404 and arena.pool[2].id.encode() in body and b"can no longer be read" in body
        for _ in range(30):
            _, out = _request(f"{url}/api/pair")
            pair = json.loads(out)
            assert "/image/2" not in (pair["left"]["url"], pair["right"]["url"])


def test_the_page_never_judges_a_pair_whose_image_failed_to_load(page, tmp_path):
    """Three images, one deleted after ingest. While the first pair's images are held in flight, keys
    and clicks record nothing; released, a failed image makes the page skip its pair; the one pair
    of readable images is judged; then the page says no readable pair is left."""
    root = photo_dataset(tmp_path, 3)
    arena = build_arena(root, ArenaConfig(pool=3), ratings=tmp_path / "r.sqlite")
    broken = arena.pool[1].id
    Path(arena.pool[1].ref.file).unlink()
    held, holding = [], [True]

    def hold(route):
        if holding[0]:
            held.append(route)
        else:
            route.continue_()

    with serving(create_app(arena), threads=2) as url:
        page.route("**/image/*", hold)
        page.goto(url)
        page.fill("#rater", "alice")
        page.evaluate("document.activeElement.blur()")  # keys go to the page, not the name field
        page.wait_for_function("pair !== null")
        while len(held) < 2:  # both image requests are in flight and held
            page.wait_for_timeout(20)
        page.keyboard.press("ArrowLeft")
        page.click("#right-frame")
        page.wait_for_function(
            "document.getElementById('status').textContent === 'wait until both images have loaded'"
        )
        assert arena.store.count() == 0
        holding[0] = False
        for route in held:
            route.continue_()
        page.wait_for_function("ready()")  # the readable pair: shown first, or after the skip
        page.keyboard.press("ArrowLeft")
        page.wait_for_function("undoStack.length === 1")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('no pair left')")
        assert "1 pool image(s) could not be read" in page.inner_text("#status")
        page.keyboard.press("ArrowLeft")  # nothing on screen to judge
        page.click("#left-frame")
    rows = arena.store.all()
    assert len(rows) == 1 and broken not in (rows[0].left_id, rows[0].right_id)


def _no_nan(name: str):
    raise AssertionError(f"{name} in a JSON answer")


def test_an_image_with_a_nan_embedding_costs_only_its_prediction(dataset, tmp_path):
    """A classifier judge over embeddings where one pool image's vector is NaN: every pair request
    still answers 200 with valid JSON; pairs with that image carry no prediction, the others do,
    and the uncertain mode prefers pairs it can score."""
    import numpy as np
    import torch

    from bigasp.quality.models import QualityClassifier
    from bigasp.quality.pairwise import judge_fn

    arena = build_arena(dataset, ArenaConfig(pool=6), ratings=tmp_path / "ratings.sqlite")
    torch.manual_seed(0)
    vectors = np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32)
    vectors[0] = np.nan
    judge = judge_fn(QualityClassifier(16), vectors, strict=False)
    arena.judge = arena.picker.judge = judge
    with serving(create_app(arena), threads=2) as url:
        for mode in ("random", "uncertain"):
            with_nan = 0
            for _ in range(25):
                status, body = _request(f"{url}/api/pair?mode={mode}&predict=1")
                assert status == 200, body
                pair = json.loads(body, parse_constant=_no_nan)  # a browser's JSON.parse refuses NaN
                has_nan = "/image/0" in (pair["left"]["url"], pair["right"]["url"])
                with_nan += has_nan
                assert ("prediction" in pair) != has_nan, pair
            if mode == "random":
                assert with_nan > 0  # the NaN image is still shown: it has a readable photo
            else:
                assert with_nan == 0
    with pytest.raises(Exception, match="NaN/Inf probabilities"):  # the tournament stays strict
        judge_fn(QualityClassifier(16), vectors)(np.array([0]), np.array([1]))
