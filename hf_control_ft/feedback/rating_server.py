"""The rating page: a small HTTP server (Python's standard library) over a run's ``ratings/`` files
(:mod:`.rating`).

Why not Gradio: the page needs per-rater identities that another rater cannot forge, submissions bound to what
the server showed that rater, replay refusal and a strict content policy; a standard-library server does that
in one module the tests drive end to end, and the core library gains no web dependency.

Access: every API call carries ``Authorization: Bearer <token>``; the rater is the one whose token it is (the
client never names itself). ``GET /api/next`` hands the rater one query as an *assignment* (``GET /api/progress`` only reports progress) (a random id bound
to that rater and query); ``GET /api/image/<assignment>/<n>`` shows its image(s); ``POST /api/rate``
``{"assignment", "value"}`` (pairwise: ``{"assignment", "better": 0 | 1}``; or ``"skip": true``) is accepted once,
from that rater, with a value on the scale.
A query is never given to a rater who rated or skipped it, and is handed out to at most ``ratings_per_query``
raters at once; an assignment left open (a closed tab) goes back to the pool after ``assignment_ttl`` seconds,
and the same rater gets it back when they return before that. Two pages on one run cannot take one rater's
rating of a query twice (the ratings log refuses it under its lock), and a page started with other rating settings
than the run's is refused (``ratings/settings.json``).

The server is bounded like every server of the library (``utils/http_server.py``): connections capped, idle ones
closed, bodies of 0..4096 bytes, every bad request answered. New raters' login links are written to
``ratings/logins/<name>.url`` (readable by the operator only), never printed: job logs and trackers that capture
standard output must not hold them. ``hf-control-ft rate --revoke NAME`` ends a rater's access at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from http import HTTPStatus

from ..utils.http_server import BoundedHTTPServer, RequestError, SafeHandler
from .rating import (
    RATING_MODES,
    DuplicateRatingError,
    RatingFiles,
    RatingScale,
    latest_queue_times,
    summarize,
    token_matches,
)

ASSETS = {"/": ("rating_page.html", "text/html; charset=utf-8"), "/rating.js": ("rating_page.js", "text/javascript")}
MAX_BODY = 4096
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Referrer-Policy": "no-referrer",
           "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src "
                                      "'unsafe-inline'; img-src blob:; connect-src 'self'; form-action 'none'; "
                                      "frame-ancestors 'none'"}


class RatingError(RequestError):
    """A request the page refuses: its status and a one-line reason."""


class RatingBoard:
    """What the page shows and accepts, shared by the server's threads (one lock).

    ``mode="score"``: a query is shown alone and rated on ``scale`` by ``ratings_per_query`` different raters.
    ``mode="pairwise"``: two queries are shown side by side and the rater picks the better one; every query takes
    part in ``ratings_per_query`` comparisons, and no rater sees the same pair twice. Half the comparisons of a
    later round's query (at least one) are with earlier rounds' queries (anchors: the rounds' levels on one scale),
    the others with its own round's; queries of one prompt are paired first (values:
    :func:`~hf_control_ft.feedback.preferences.bradley_terry`).
    """

    def __init__(self, files: RatingFiles, scale: RatingScale, ratings_per_query: int = 1,
                 assignment_ttl: float = 600.0, mode: str = "score"):
        if mode not in RATING_MODES:
            raise ValueError(f"mode must be one of {RATING_MODES}, got {mode!r}")
        self.files, self.scale, self.ratings_per_query, self.mode = files, scale, ratings_per_query, mode
        self.assignment_ttl = assignment_ttl
        self.lock = threading.Lock()
        self.queue: list[dict] = []
        self.ratings: list[dict] = []
        self._offsets = [0, 0]
        self.open: dict[str, tuple[str, tuple[str, ...], float]] = {}  # assignment -> (rater, keys, issued)
        self.used: set[str] = set()  # assignments already submitted (also read back from the log)
        self.since: dict[str, float] = {}  # key -> its latest queue time (a requeued query's old skips are out)
        self._verified: dict[str, tuple[str, str]] = {}  # sha256(token) -> (rater, stored entry), this process only

    def refresh(self) -> None:
        queue, queue_end = self.files.read_lines(self.files.queue_path, self._offsets[0])
        ratings, ratings_end = self.files.read_lines(self.files.ratings_path, self._offsets[1])
        self._offsets[:] = [queue_end, ratings_end]  # both reads succeeded: nothing read is skipped
        self.queue.extend(queue)
        self.since.update(latest_queue_times(queue))
        self.ratings.extend(ratings)
        self.used.update(r["assignment"] for r in ratings)

    def summary(self) -> dict:
        return summarize(self.ratings, self.since)

    def rater_of(self, token: str | None) -> str:
        """The rater whose token this is (the registry is read at every request: a revoked rater is out at once)."""
        if not token:
            raise RatingError(HTTPStatus.UNAUTHORIZED, "a rater token is required")
        raters = self.files.raters()
        digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
        known = self._verified.get(digest)
        if known is not None and raters.get(known[0]) == known[1]:
            return known[0]
        for name, stored in raters.items():
            if token_matches(token, stored):
                self._verified[digest] = (name, stored)
                return name
        raise RatingError(HTTPStatus.UNAUTHORIZED, "unknown token")

    def progress(self, summary: dict) -> dict:
        current = max((q["round"] for q in self.queue), default=0)
        keys = {q["key"] for q in self.queue if q["round"] == current}
        done = sum(1 for k in keys if summary.get(k, {}).get("count", 0) >= self.ratings_per_query)
        return {"round": current, "done": done, "total": len(keys), "ratings": len(self.ratings)}

    def status(self, rater: str) -> dict:
        """Progress of the current round, without handing anything out."""
        with self.lock:
            self.refresh()
            return {"rater": rater, "mode": self.mode, "progress": self.progress(self.summary())}

    def next_for(self, rater: str) -> dict:
        """The rater's open assignment, or a new one (``assignment`` ``None`` when nothing is left for them)."""
        with self.lock:
            self.refresh()
            summary = self.summary()
            now = time.time()
            self.open = {a: v for a, v in self.open.items() if now - v[2] < self.assignment_ttl and a not in self.used}
            out = {"rater": rater, "mode": self.mode, "scale": self.scale.values(), "progress": self.progress(summary)}
            mine = [(a, keys) for a, (r, keys, _) in self.open.items() if r == rater]
            keys = mine[0][1] if mine else self._choose(rater, summary)
            if keys is None:
                out.update(assignment=None)
                return out
            assignment = mine[0][0] if mine else secrets.token_urlsafe(16)
            self.open[assignment] = (rater, keys, self.open.get(assignment, (0, 0, now))[2])
            prompts = {q["key"]: q["prompt"] for q in self.queue}
            out.update(assignment=assignment, prompt=prompts[keys[0]],
                       prompts=[prompts[k] for k in keys],
                       images=[f"/api/image/{assignment}/{n}" for n in range(len(keys))])
            return out

    def queries(self) -> list[dict]:
        """One entry per queued key (a requeued key keeps its first round)."""
        first: dict[str, dict] = {}
        for q in self.queue:
            first.setdefault(q["key"], q)
        return list(first.values())

    def _choose(self, rater: str, summary: dict) -> tuple[str, ...] | None:
        busy: dict[str, int] = {}
        for _, keys, _ in self.open.values():
            for k in keys:
                busy[k] = busy.get(k, 0) + 1

        def load(key):
            return summary.get(key, {}).get("count", 0) + busy.get(key, 0)

        queries = self.queries()
        round_of = {q["key"]: q["round"] for q in queries}
        first_round = min(round_of.values(), default=0)
        order = sorted(queries, key=lambda q: (q["round"], load(q["key"]), q["time"]))
        for q in order:
            s = summary.get(q["key"], {})
            if load(q["key"]) >= self.ratings_per_query:
                continue
            if self.mode == "score":
                if rater not in s.get("raters", set()):
                    return (q["key"],)
                continue
            seen = s.get("pairs", set())
            fresh = [p for p in order if p["key"] != q["key"] and (rater, p["key"]) not in seen]
            same = [p for p in fresh if p["round"] == q["round"]]
            earlier = [p for p in fresh if p["round"] < q["round"]]
            anchored = sum(round_of.get(other, q["round"]) < q["round"] for _, other in seen)
            # half the comparisons of a later-round query (at least one) are with earlier rounds' queries: the
            # rounds' levels on one scale (docs/algorithms.md §12)
            needs_anchor = q["round"] > first_round and anchored < max(1, self.ratings_per_query // 2)
            partners = earlier if (needs_anchor and earlier) else (same or earlier)
            partners.sort(key=lambda p: (p["prompt"] != q["prompt"], load(p["key"])))  # same prompt first
            if partners:
                return (q["key"], partners[0]["key"])
        return None

    def image(self, rater: str, assignment: str) -> bytes:
        assignment, _, index = assignment.partition("/")
        with self.lock:
            held = self.open.get(assignment)
            if held is None or held[0] != rater or index not in [str(n) for n in range(len(held[1]))]:
                raise RatingError(HTTPStatus.FORBIDDEN, "not an open assignment of this rater")
            key = held[1][int(index)]
        with open(os.path.join(self.files.images_dir, f"{key}.png"), "rb") as f:
            return f.read()

    def submit(self, rater: str, body: dict) -> dict:
        field = "value" if self.mode == "score" else "better"
        extra = set(body) - {"assignment", field, "skip"}
        if extra:
            raise RatingError(HTTPStatus.BAD_REQUEST, f"unknown fields {sorted(extra)}")
        assignment, skip = body.get("assignment"), body.get("skip") is True
        value = None if skip else body.get(field)
        with self.lock:
            self.refresh()
            if not isinstance(assignment, str) or assignment in self.used:
                raise RatingError(HTTPStatus.CONFLICT, "this assignment was already submitted")
            held = self.open.get(assignment)
            if held is None or held[0] != rater:
                raise RatingError(HTTPStatus.FORBIDDEN, "not an open assignment of this rater")
            if self.mode == "score" and not skip and not self.scale.accepts(value):
                raise RatingError(HTTPStatus.BAD_REQUEST, f"value must be one of {self.scale.values()}, got {value!r}")
            if self.mode == "pairwise" and not skip and (isinstance(value, bool) or value not in (0, 1)):
                raise RatingError(HTTPStatus.BAD_REQUEST, f"better must be 0 (left) or 1 (right), got {value!r}")
            keys = held[1]
            since = max(self.since.get(k, 0.0) for k in keys)
            del self.open[assignment]
            try:
                if self.mode == "score":
                    self.files.add_rating(keys[0], rater, None if skip else float(value), assignment, since=since)
                else:  # value 1.0: the first key was preferred
                    self.files.add_rating(keys[0], rater, None if skip else float(value == 0), assignment,
                                          other=keys[1], since=since)
            except DuplicateRatingError as err:  # another page on this run took it first
                raise RatingError(HTTPStatus.CONFLICT, str(err)) from None
            self.refresh()  # reads our line back (and any another process appended)
            return {"ok": True, "progress": self.progress(self.summary())}


class _Handler(SafeHandler):
    server_version = "hf-control-ft-rating"
    board: RatingBoard
    extra_headers = HEADERS
    token_required = True  # every API call carries a rater's token; the page and its script are public

    def _rater(self) -> str:
        auth = self.headers.get("Authorization", "")
        return self.board.rater_of(auth[7:].strip() if auth.startswith("Bearer ") else None)

    def handle_get(self) -> None:
        if self.path in ASSETS:
            name, content_type = ASSETS[self.path]
            with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
                return self.send_bytes(HTTPStatus.OK, f.read(), content_type)
        if self.path == "/api/progress":
            return self.send_json(HTTPStatus.OK, self.board.status(self._rater()))
        if self.path == "/api/next":
            return self.send_json(HTTPStatus.OK, self.board.next_for(self._rater()))
        if self.path.startswith("/api/image/"):  # /api/image/<assignment>/<n>
            png = self.board.image(self._rater(), self.path[len("/api/image/"):])
            return self.send_bytes(HTTPStatus.OK, png, "image/png")
        raise RatingError(HTTPStatus.NOT_FOUND, "not found")

    def handle_post(self) -> None:
        if self.path != "/api/rate":
            raise RatingError(HTTPStatus.NOT_FOUND, "not found")
        rater = self._rater()
        try:
            body = json.loads(self.read_body(MAX_BODY) or b"{}")
        except (ValueError, RecursionError):
            raise RatingError(HTTPStatus.BAD_REQUEST, "malformed request") from None
        if not isinstance(body, dict):
            raise RatingError(HTTPStatus.BAD_REQUEST, "malformed request")
        self.send_json(HTTPStatus.OK, self.board.submit(rater, body))


class RatingServer(BoundedHTTPServer):
    """The page of one run's ratings at ``http://host:port/`` (``port=0``: any free port; see :attr:`url`)."""

    def __init__(self, board: RatingBoard, host: str = "127.0.0.1", port: int = 7860, max_connections: int = 32,
                 handler_timeout: float | None = None):
        attributes = {"board": board}
        if handler_timeout is not None:
            attributes["timeout"] = float(handler_timeout)
        super().__init__((host, port), type("RatingHandler", (_Handler,), attributes), max_connections)
        self.board = board

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def start_rating_server(output_dir: str, scale: RatingScale | None = None, ratings_per_query: int = 1,
                        host: str = "127.0.0.1", port: int = 7860, raters=None, assignment_ttl: float = 600.0,
                        announce: bool = True, mode: str = "score", started_by: str = "this rating page",
                        max_connections: int = 32) -> RatingServer:
    """Registers ``raters`` (names, or ``{name: token}``), starts the page in a daemon thread and returns it.
    New raters' login links are written to ``ratings/logins/<name>.url`` (0600); only that directory is printed.
    ``started_by``: how the caller's settings are named when they differ from the run's (e.g. the flags)."""
    files = RatingFiles(output_dir)
    tokens = raters if isinstance(raters, dict) else None
    if not raters and not files.raters():
        raise ValueError("no rater is registered: give raters (names) so that someone can log in")
    scale = scale or RatingScale()
    files.agree_settings(mode, ratings_per_query, scale, started_by)
    board = RatingBoard(files, scale, ratings_per_query, assignment_ttl, mode)
    server = RatingServer(board, host, port, max_connections)  # bound before any token is made: a busy port loses none
    new = files.add_raters(list(raters or []), tokens=tokens)
    threading.Thread(target=server.serve_forever, name="hf_control_ft-rating-page", daemon=True).start()
    links = {name: f"{server.url}#token={token}" for name, token in new.items() if not tokens}
    logins = files.write_logins(links) if links else None  # a token the caller chose is theirs: never written
    if announce:
        print(f"rating page for {output_dir}: {server.url}", flush=True)
        if logins:
            print(f"  login links of the new raters ({', '.join(links)}): {logins}/<name>.url (readable by you "
                  "only; send each to its rater)", flush=True)
    return server


__all__ = ["RatingServer", "RatingBoard", "RatingError", "start_rating_server"]
