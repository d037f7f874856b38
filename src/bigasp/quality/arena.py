"""The rating arena: a Flask app served by waitress (a production WSGI server, pure Python).

Flask because bigASP's own arena is Flask and the app is a handful of synchronous routes
over SQLite; waitress because it is a maintained multi-threaded server with no C parts.
Images are addressed only by their slot in the pool (`/image/<int>`), so no request path
ever reaches the filesystem; ratings name pool ids and are checked against the pool.

Guard rails, because the arena is reachable from any web page the rater's browser opens: the
Host header must be a loopback name, the --host value or a name the user allowed (a page on
another site that rebinds its DNS name to 127.0.0.1 still sends its own name); request bodies
are capped at MAX_BODY (waitress refuses a longer Content-Length before reading it); a body
that is not a JSON object of the expected types is a 400 with a message; undo needs the secret
returned with the rating (an HMAC of rating id and rater under a per-server key), so one rater
cannot undo another's judgement by sending their name.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bigasp.quality.images import open_image
from bigasp.quality.pool import MODES, PairPicker, PoolImage
from bigasp.quality.ratings import OUTCOMES, RatingStore

log = logging.getLogger(__name__)
TOKEN_COOKIE = "bigasp_arena_token"
MAX_RATER = 64
MAX_BODY = 64 * 1024  # the arena's requests are JSON objects of a few hundred bytes
WILDCARDS = ("0.0.0.0", "::", "")


def _host_name(header: str) -> str:
    """The name part of a Host header (`name`, `name:port`, `[v6]:port`), lower-case, no trailing dot."""
    h = header.strip().lower()
    if h.startswith("["):
        h = h[1 : h.find("]")] if "]" in h else ""
    elif h.count(":") == 1:
        h = h.rsplit(":", 1)[0]
    return h.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class HostPolicy:
    """Which Host headers the arena answers (DNS rebinding: a foreign page sends its own name).

    Loopback names and addresses, the address it listens on, and `allowed` names always pass;
    when it listens on every interface (0.0.0.0 / ::), so does any IP address: a browser that
    opens http://192.168.1.5:5034 sends that address, which no other site can make it send.
    """

    bind: str = "127.0.0.1"
    allowed: tuple[str, ...] = ()

    def allows(self, header: str | None) -> bool:
        name = _host_name(header or "")
        if not name:
            return False
        if is_loopback(name) or name == _host_name(self.bind):
            return True
        if name in {_host_name(a) for a in self.allowed}:
            return True
        return self.bind in WILDCARDS and _is_ip(name)


@dataclass(eq=False)  # hashed by identity: image_bytes caches per arena
class Arena:
    """Everything the app serves: the pool, the store, the pair picker, an optional model."""

    pool: list[PoolImage]
    store: RatingStore
    picker: PairPicker
    judge: Any = None  # judge(first_idx, second_idx) -> P(first better) over pool indices
    token: str | None = None
    max_side: int = 1024
    hosts: HostPolicy = field(default_factory=HostPolicy)
    undo_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def __post_init__(self) -> None:
        self.slot = {p.id: k for k, p in enumerate(self.pool)}

    def undo_token(self, rating_id: int, rater: str) -> str:
        """The secret that lets only the page that made a rating undo it (valid for this server run)."""
        msg = f"{rating_id}\0{rater}".encode()
        return hmac.new(self.undo_key, msg, hashlib.sha256).hexdigest()[:32]

    def progress(self, rater: str | None) -> dict[str, int]:
        rated = self.store.rated_pairs()
        return {
            "total": self.store.count(),
            "mine": self.store.count(rater) if rater else 0,
            "pool": len(self.pool),
            "pairs_left": self.picker.total_pairs() - self.picker.rated_in_pool(rated),
        }

    @functools.lru_cache(maxsize=512)  # noqa: B019 - one Arena per server; bounded
    def image_bytes(self, slot: int) -> bytes:
        p = self.pool[slot]
        im = open_image(p.ref, p.orientation, max_side=self.max_side)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=92)
        return buf.getvalue()


def _json_object(request) -> dict[str, Any] | None:
    """The body as a JSON object, or None for anything else (not JSON, an array, nested too deep)."""
    raw = request.get_data(cache=False)  # bounded by MAX_CONTENT_LENGTH: longer is a 413
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _rater(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if 0 < len(value) <= MAX_RATER and value.isprintable() else None


def create_app(arena: Arena):
    from flask import Flask, Response, jsonify, make_response, request

    app = Flask("bigasp-arena")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    @app.errorhandler(413)  # a body over MAX_CONTENT_LENGTH (e.g. chunked, with no length)
    def _too_large(_err):
        return jsonify(
            error=f"request body over {MAX_BODY // 1024} KiB; the arena takes small JSON objects"
        ), 413

    @app.before_request
    def _check_host():
        host = request.environ.get("HTTP_HOST")
        if arena.hosts.allows(host):
            return None
        log.warning("refused a request for Host %r (not this arena's name)", host)
        return Response(
            f"forbidden: this arena does not answer to the name {host!r}; open it by a loopback "
            "address or the --host address, or start it with --allow-host NAME\n",
            403, mimetype="text/plain",
        )  # fmt: skip

    @app.before_request
    def _check_token():
        if arena.token is None:
            return None
        given = (
            request.args.get("token")
            or request.headers.get("X-Arena-Token")
            or request.cookies.get(TOKEN_COOKIE)
        )
        if not given or not hmac.compare_digest(given.encode(), arena.token.encode()):
            return Response(
                "forbidden: open the arena with ?token=<the shared secret>\n", 403, mimetype="text/plain"
            )
        return None

    @app.after_request
    def _headers(resp):
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        cached = request.path.startswith("/image/") and resp.status_code == 200
        resp.headers["Cache-Control"] = "private, max-age=3600" if cached else "no-store"
        return resp

    @app.get("/")
    def index():
        resp = make_response(PAGE.replace("__MODES__", ",".join(_modes(arena))))
        resp.mimetype = "text/html"
        if arena.token is not None and request.args.get("token"):
            resp.set_cookie(TOKEN_COOKIE, arena.token, httponly=True, samesite="Strict")
        return resp

    @app.get("/api/pair")
    def pair():
        mode = request.args.get("mode", "random")
        if mode not in MODES:
            return jsonify(error=f"mode must be one of {', '.join(MODES)}"), 400
        picked = arena.picker.pick(mode)
        rater = _rater(request.args.get("rater"))
        if picked is None:
            return jsonify(done=True, unreadable=len(arena.picker.excluded), progress=arena.progress(rater))
        i, j = picked
        out: dict[str, Any] = {
            "left": {"id": arena.pool[i].id, "url": f"/image/{i}"},
            "right": {"id": arena.pool[j].id, "url": f"/image/{j}"},
            "progress": arena.progress(rater),
        }
        if request.args.get("predict") == "1" and arena.judge is not None:
            p = float(arena.judge(np.array([i]), np.array([j]))[0])  # P(left better)
            if np.isfinite(p):  # NaN (an image with a NaN embedding) is no prediction, and no JSON
                out["prediction"] = p
        return jsonify(out)

    @app.post("/api/rate")
    def rate():
        body = _json_object(request)
        if body is None:
            return jsonify(error=NOT_AN_OBJECT.format("left, right, outcome, rater")), 400
        rater = _rater(body.get("rater"))
        left, right, outcome = body.get("left"), body.get("right"), body.get("outcome")
        if rater is None:
            return jsonify(error="enter a rater name (1-64 printable characters)"), 400
        if not isinstance(outcome, str) or outcome not in OUTCOMES:
            return jsonify(error=f"outcome must be one of {', '.join(OUTCOMES)}"), 400
        if not all(isinstance(v, str) and v in arena.slot for v in (left, right)) or left == right:
            return jsonify(error="left and right must be the ids of two different images of the pool"), 400
        rid = arena.store.add(left, right, outcome, rater=rater, source="human")
        return jsonify(rating_id=rid, undo_token=arena.undo_token(rid, rater), progress=arena.progress(rater))

    @app.post("/api/undo")
    def undo():
        body = _json_object(request)
        if body is None:
            return jsonify(error=NOT_AN_OBJECT.format("rating_id, undo_token, rater")), 400
        rater = _rater(body.get("rater"))
        rid, secret = body.get("rating_id"), body.get("undo_token")
        if rater is None or isinstance(rid, bool) or not isinstance(rid, int) or not 0 < rid < 2**63:
            return jsonify(error="undo needs the rater and the rating_id (a positive whole number)"), 400
        if not isinstance(secret, str) or not hmac.compare_digest(
            secret.encode(), arena.undo_token(rid, rater).encode()
        ):
            return jsonify(
                error="only the page that made a rating can undo it (wrong or missing undo_token)"
            ), 403
        return jsonify(undone=arena.store.undo(rid, rater=rater), progress=arena.progress(rater))

    @app.get("/api/progress")
    def progress():
        return jsonify(arena.progress(_rater(request.args.get("rater"))))

    @app.get("/image/<int:slot>")
    def image(slot: int):
        if not 0 <= slot < len(arena.pool):
            return Response("no such image\n", 404, mimetype="text/plain")
        try:
            data = arena.image_bytes(slot)
        except Exception as err:  # a file deleted or damaged since ingest: skip it, keep serving
            p = arena.pool[slot]
            arena.picker.exclude(slot)
            log.warning("pool image %s (%s) cannot be read, left out of new pairs: %s", p.id, p.ref.file, err)
            return Response(
                f"image {p.id} can no longer be read ({type(err).__name__}); it is left out of new pairs\n",
                404, mimetype="text/plain",
            )  # fmt: skip
        return Response(data, mimetype="image/jpeg")

    return app


NOT_AN_OBJECT = "the request body must be a JSON object with {}"


def _modes(arena: Arena) -> list[str]:
    modes = ["random"]
    if arena.judge is not None:
        modes.append("uncertain")
    if arena.picker.flagged.any():
        modes.append("flagged")
    return modes


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(app, host: str = "127.0.0.1", port: int = 5034, threads: int = 8, *, token: bool = False):
    """A waitress server (not yet running); `.effective_port` is the bound port (port 0 = any)."""
    from waitress import create_server

    if not is_loopback(host):
        log.warning(
            "the arena listens on %s, not only this machine: anyone who can reach it can see the pool "
            "images and rate%s", host, "" if token else " (set --token to require a shared secret)",
        )  # fmt: skip
    return create_server(
        app, host=host, port=port, threads=threads, ident="bigasp-arena", max_request_body_size=MAX_BODY
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bigasp quality arena</title>
<style>
  :root { color-scheme: dark; font-family: system-ui, sans-serif; }
  body { margin: 0; background: #16181c; color: #e6e6e6; display: flex; flex-direction: column; height: 100vh; }
  header { display: flex; gap: 1.2em; align-items: center; padding: .6em 1em; background: #202329; flex-wrap: wrap; }
  header label { font-size: .9em; }
  #progress { margin-left: auto; font-size: .9em; color: #b8c0cc; }
  main { flex: 1; display: flex; gap: 12px; padding: 12px; min-height: 0; }
  .side { flex: 1; display: flex; flex-direction: column; align-items: center; min-width: 0; }
  .frame { flex: 1; width: 100%; display: flex; align-items: center; justify-content: center; min-height: 0;
           border: 3px solid transparent; border-radius: 8px; cursor: pointer; background: #0f1114; }
  .frame:hover { border-color: #4f8cff; }
  .frame img { width: 100%; height: 100%; object-fit: contain; }  /* scaled to fit, up or down */
  .frame img:not([src]) { visibility: hidden; }  /* no pair: no broken-image icon */
  footer { display: flex; gap: .8em; justify-content: center; padding: .6em; background: #202329; align-items: center; }
  button { font-size: 1em; padding: .5em 1.1em; border-radius: 6px; border: 1px solid #3a3f48; background: #2b2f36; color: #e6e6e6; cursor: pointer; }
  button:hover { background: #3a404a; }
  kbd { background: #3a3f48; border-radius: 3px; padding: 0 .3em; font-size: .85em; }
  #status { min-width: 14em; text-align: center; color: #9fd39f; }
  #prediction { color: #e0b96a; font-size: .9em; }
</style></head>
<body>
<header>
  <strong>bigasp arena</strong>
  <label>Rater <input id="rater" size="14" placeholder="your name" autocomplete="off"></label>
  <label>Pairs <select id="mode"></select></label>
  <label><input type="checkbox" id="show-prediction"> show model prediction</label>
  <span id="prediction"></span>
  <span id="progress"></span>
</header>
<main>
  <div class="side"><div class="frame" id="left-frame" title="left is better (&larr;)"><img id="left" alt="left image"></div></div>
  <div class="side"><div class="frame" id="right-frame" title="right is better (&rarr;)"><img id="right" alt="right image"></div></div>
</main>
<footer>
  <button id="btn-left">Left better <kbd>&larr;</kbd></button>
  <button id="btn-tie">Tie / can't tell <kbd>space</kbd></button>
  <button id="btn-right">Right better <kbd>&rarr;</kbd></button>
  <button id="btn-undo">Undo <kbd>z</kbd></button>
  <span id="status"></span>
</footer>
<script>
const MODES = "__MODES__".split(",");
const $ = (id) => document.getElementById(id);
let pair = null, busy = false, undoStack = [], loaded = {left: false, right: false}, failures = 0;
const MAX_FAILURES = 20;  // images failing one after another: stop fetching and say so
const modeSel = $("mode");
for (const m of MODES) { const o = document.createElement("option"); o.value = o.textContent = m; modeSel.appendChild(o); }
$("rater").value = localStorage.getItem("arena-rater") || "";
modeSel.value = localStorage.getItem("arena-mode") || "random";
if (!MODES.includes(modeSel.value)) modeSel.value = "random";
$("rater").addEventListener("change", () => { localStorage.setItem("arena-rater", rater()); refreshProgress(); });
modeSel.addEventListener("change", () => { localStorage.setItem("arena-mode", modeSel.value); next(); });
$("show-prediction").addEventListener("change", next);
function rater() { return $("rater").value.trim(); }
function status(text, bad) { const s = $("status"); s.textContent = text; s.style.color = bad ? "#ff8f8f" : "#9fd39f"; }
function showProgress(p) {
  $("progress").textContent = `ratings: ${p.total} · yours: ${p.mine} · unrated pairs in pool (${p.pool} images): ${p.pairs_left}`;
}
// A pair can be judged only once both of its images are on screen; one that fails is skipped.
function ready() { return pair !== null && loaded.left && loaded.right; }
for (const side of ["left", "right"]) {
  $(side).addEventListener("load", () => {
    if (!pair || $(side).src !== new URL(pair[side].url, location.href).href) return;
    loaded[side] = true;
    if (ready()) failures = 0;
  });
  $(side).addEventListener("error", () => {
    if (!pair || $(side).src !== new URL(pair[side].url, location.href).href) return;
    pair = null;
    failures += 1;
    if (failures >= MAX_FAILURES) { status("images keep failing to load: see the arena's log", true); return; }
    status(`the ${side} image could not be loaded; showing another pair`, true);
    next();
  });
}
async function refreshProgress() {
  const r = await fetch(`/api/progress?rater=${encodeURIComponent(rater())}`); showProgress(await r.json());
}
async function next() {
  const q = new URLSearchParams({mode: modeSel.value, rater: rater(), predict: $("show-prediction").checked ? "1" : "0"});
  pair = null; loaded = {left: false, right: false};
  const r = await fetch(`/api/pair?${q}`);
  const d = await r.json();
  if (!r.ok) { status(d.error || "error", true); return; }
  showProgress(d.progress);
  if (d.done) {
    $("left").removeAttribute("src"); $("right").removeAttribute("src");
    if (d.unreadable) status(`no pair left whose images can be read (${d.unreadable} pool image(s) could not be read: see the arena's log)`, true);
    else status("every pair in the pool is rated");
    return;
  }
  pair = d;
  $("left").src = d.left.url; $("right").src = d.right.url;
  for (const side of ["left", "right"]) if ($(side).complete && $(side).naturalWidth > 0) loaded[side] = true;
  $("prediction").textContent = d.prediction === undefined ? "" : `model: left better with p = ${d.prediction.toFixed(2)}`;
}
async function rate(outcome) {
  if (busy) return;
  if (!ready()) { if (pair) status("wait until both images have loaded", true); return; }
  if (!rater()) { status("enter your name first", true); $("rater").focus(); return; }
  busy = true;
  try {
    const who = rater();
    const r = await fetch("/api/rate", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({left: pair.left.id, right: pair.right.id, outcome, rater: who})});
    const d = await r.json();
    if (!r.ok) { status(d.error || "error", true); return; }
    undoStack.push({rating_id: d.rating_id, undo_token: d.undo_token, rater: who});
    status(outcome === "tie" ? "recorded: tie" : `recorded: ${outcome} better`);
    await next();
  } finally { busy = false; }
}
async function undo() {
  if (busy || !undoStack.length) { status("nothing to undo", true); return; }
  busy = true;
  try {
    const r = await fetch("/api/undo", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify(undoStack.pop())});
    const d = await r.json();
    status(d.undone ? "undone" : (d.error || "could not undo"), !d.undone);
    if (d.progress) showProgress(d.progress);
  } finally { busy = false; }
}
$("left-frame").addEventListener("click", () => rate("left"));
$("right-frame").addEventListener("click", () => rate("right"));
$("btn-left").addEventListener("click", () => rate("left"));
$("btn-right").addEventListener("click", () => rate("right"));
$("btn-tie").addEventListener("click", () => rate("tie"));
$("btn-undo").addEventListener("click", undo);
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
  if (e.key === "ArrowLeft") { e.preventDefault(); rate("left"); }
  else if (e.key === "ArrowRight") { e.preventDefault(); rate("right"); }
  else if (e.key === " ") { e.preventDefault(); rate("tie"); }
  else if (e.key === "z" || e.key === "Backspace") { e.preventDefault(); undo(); }
});
next();
</script>
</body></html>
"""


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0, threads: int = 4, *, token: bool = False):
    """Serve `app` from a background thread; yields the base URL; stops cleanly on exit.

    The loop polls a stop flag between short `select` calls, so the sockets are closed only
    after the loop has returned (closing them under a running `select` raises EBADF).
    """
    server = make_server(app, host, port, threads, token=token)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            server.asyncore.loop(timeout=0.05, map=server._map, count=1)

    thread = threading.Thread(target=loop, name="bigasp-arena", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.effective_port}"
    finally:
        stop.set()
        thread.join(10)
        server.close()
        server.task_dispatcher.shutdown()
