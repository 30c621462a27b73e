"""People as the oracle: the rating queue on disk that the web page serves (:mod:`.rating_server`) and
:class:`~hf_control_ft.feedback.human_oracle.HumanOracle` waits on.

One run's files, under ``<output_dir>/ratings/`` (directories 0700, files 0600: ratings and images are the
operator's, not every local user's):

* ``queue.jsonl``: one line per query to rate, ``{"key", "prompt", "round", "time"}``; ``images/<key>.png`` its
  image. ``key`` is the SHA-256 of the PNG and the prompt, so the same sample asked again after a restart is
  the same query: its ratings are reused and nobody is asked twice. A query every rater skipped that the trainer
  asks again is queued again (a second line): skips older than its latest line no longer count, so it reaches
  people again.
* ``ratings.jsonl``: one line per submission, appended under an exclusive lock and flushed to disk the moment it
  is submitted: ``{"key", "rater", "value"`` (``null`` for a skip) ``, "time", "assignment"}`` (pairwise: also
  ``"other"``). Under the same lock the append refuses a second rating of one query (one pair) by one rater, so
  two rating pages on one run cannot take it twice. A line torn by a crash or a full disk costs that line alone:
  the next append first ends it, and readers skip a line that is not a complete record (with a warning).
* ``raters.json``: ``{name: "pbkdf2_sha256$<iterations>$<salt>$<hash>"}``; tokens themselves are never stored or
  logged. New raters' login links are written to ``logins/<name>.url`` (0600), never printed.
* ``settings.json``: the run's rating mode, ``ratings_per_query`` and scale, written by the first page or trainer;
  a page or trainer started with other settings is refused (they would wait on each other forever).

Several processes may read and append (a trainer and a separate ``hf-control-ft rate`` page): appends take an
``fcntl`` lock and every reader reads complete lines only.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass

from ..utils.versioned_dir import write_atomic

logger = logging.getLogger(__name__)

RATINGS_DIR = "ratings"
RATING_MODES = ("score", "pairwise")
#: PBKDF2-SHA256 iterations of a stored rater token (about 20 ms: each token is checked once per page process)
TOKEN_ITERATIONS = 100_000
QUEUE_FIELDS = ("key", "prompt", "round", "time")
RATING_FIELDS = ("key", "rater", "value", "time", "assignment")


class DuplicateRatingError(ValueError):
    """The rater already rated this query (this pair): refused under the ratings log's lock."""


class RatingSettingsError(ValueError):
    """A page or trainer started with rating settings other than the run's (``ratings/settings.json``)."""


@dataclass
class RatingScale:
    """The values a rater may give: ``minimum``, ``minimum + step``, ..., ``maximum`` (reward units)."""

    minimum: float = 1.0
    maximum: float = 10.0
    step: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.minimum) and math.isfinite(self.maximum) and self.maximum > self.minimum):
            raise ValueError(f"rating scale needs finite minimum < maximum, got {self.minimum}..{self.maximum}")
        if not (self.step > 0 and math.isfinite(self.step)):
            raise ValueError(f"rating step must be > 0, got {self.step}")

    def values(self) -> list[float]:
        n = int(round((self.maximum - self.minimum) / self.step))
        values = [self.minimum + i * self.step for i in range(n + 1)]
        return [int(v) if float(v).is_integer() else v for v in values]

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        k = (value - self.minimum) / self.step
        return self.minimum <= value <= self.maximum and abs(k - round(k)) < 1e-6


def token_hash(token: str, salt: bytes | None = None, iterations: int = TOKEN_ITERATIONS) -> str:
    """The stored form of a rater token: salted PBKDF2-SHA256 (a chosen weak token is not one hash away)."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", token.encode("utf-8"), salt, iterations).hex()
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest}"


def token_matches(token: str, stored: str) -> bool:
    """Whether ``token`` is the one ``stored`` describes (also the unsalted SHA-256 of earlier runs)."""
    if stored.startswith("pbkdf2_sha256$"):
        try:
            _, iterations, salt, _ = stored.split("$")
            expected = token_hash(token, bytes.fromhex(salt), int(iterations))
        except ValueError:
            return False
        return hmac.compare_digest(expected, stored)
    return hmac.compare_digest(hashlib.sha256(token.encode("utf-8")).hexdigest(), stored)


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    try:
        os.chmod(path, 0o700)
    except OSError:  # not ours (a shared directory): leave it
        pass


def _complete_records(data: bytes, fields: tuple[str, ...], path: str) -> list[dict]:
    """The records of complete lines of ``data`` with ``fields``; anything else (a line torn by a crash, or
    damaged) is skipped with a warning naming the file."""
    records = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or any(f not in record for f in fields):
                raise ValueError("not a complete record")
        except (ValueError, RecursionError):
            logger.warning("%s: skipped a damaged line (%d bytes; a write torn by a crash or a full disk)", path,
                           len(line))
            continue
        records.append(record)
    return records


class RatingFiles:
    """The ``ratings/`` directory of a run: the queue, the ratings log and the raters (see the module docstring)."""

    def __init__(self, output_dir: str):
        self.directory = os.path.join(output_dir, RATINGS_DIR)
        self.images_dir = os.path.join(self.directory, "images")
        self.logins_dir = os.path.join(self.directory, "logins")
        self.queue_path = os.path.join(self.directory, "queue.jsonl")
        self.ratings_path = os.path.join(self.directory, "ratings.jsonl")
        self.raters_path = os.path.join(self.directory, "raters.json")
        self.settings_path = os.path.join(self.directory, "settings.json")
        _private_dir(self.directory)
        _private_dir(self.images_dir)

    # ------------------------------------------------------------------ appends (locked, flushed)
    def _append(self, path: str, records: list[dict], check=None) -> None:
        """Appends ``records`` as JSON lines under an exclusive lock, flushed to disk. ``check(existing records)``
        runs under the same lock first (it raises to refuse). A torn last line (a crash) is ended first, so it
        alone is lost; a failed write (a full disk) is cut back off, so nothing half-written stays."""
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if check is not None:
                check(_complete_records(os.pread(fd, size, 0), RATING_FIELDS, path))
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            try:
                view = memoryview(data)
                while view:  # os.write may write less than asked
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def read_lines(path: str, offset: int = 0, fields: tuple[str, ...] | None = None) -> tuple[list[dict], int]:
        """Complete records of ``path`` from byte ``offset``; returns them and the offset after the last complete
        line (a line being written, without its newline yet, is left for the next read; a damaged line is skipped
        with a warning). ``fields``: the keys a record must have (default: those of the queue or the ratings)."""
        if not os.path.exists(path):
            return [], offset
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        if fields is None:
            fields = RATING_FIELDS if os.path.basename(path) == "ratings.jsonl" else QUEUE_FIELDS
        return _complete_records(data[:end], fields, path), offset + end

    def add_queries(self, entries: list[tuple]) -> None:
        """Queues ``(key, png, prompt, round)`` or ``(key, png, prompt, round, query_index)`` entries not queued yet
        (images written before the queue line; ``query_index``: the feedback dataset's row, kept in the line so the
        values of earlier rounds can be refitted). A queued key whose ratings since its last queue line are all
        skips is queued again (a retried failed query: people see it again)."""
        queue = self.read_lines(self.queue_path)[0]
        since = latest_queue_times(queue)
        summary = summarize(self.read_lines(self.ratings_path)[0], since)
        new, seen = [], set()
        for key, png, prompt, round_index, *query in entries:
            if key in seen:
                continue
            seen.add(key)
            s = summary.get(key)
            if key in since and not (s and s["count"] and not s["values"] and not s["compared"]):
                continue  # queued and still open, or already rated: reused
            path = os.path.join(self.images_dir, f"{key}.png")
            if not os.path.exists(path):
                write_atomic(path, png, mode=0o600)
            line = {"key": key, "prompt": prompt, "round": int(round_index), "time": time.time()}
            if query and query[0] is not None:
                line["query"] = int(query[0])
            new.append(line)
        if new:
            self._append(self.queue_path, new)

    def add_rating(self, key: str, rater: str, value: float | None, assignment: str, other: str | None = None,
                   since: float = 0.0) -> dict:
        """One submission; pairwise: ``key`` was shown with ``other`` and ``value`` is 1 when ``key`` was preferred,
        0 when ``other`` was (``None``: skipped). Refused (:class:`DuplicateRatingError`), under the log's lock, when
        this rater already answered this query (this pair) since ``since`` (its latest queue time)."""
        record = {"key": key, "rater": rater, "value": value, "time": time.time(), "assignment": assignment}
        if other is not None:
            record["other"] = other
        pair = {key, other}

        def check(existing):
            for r in existing:
                if r["assignment"] == assignment:
                    raise DuplicateRatingError("this assignment was already submitted")
                if r["rater"] == rater and r["time"] >= since and {r["key"], r.get("other")} == pair:
                    raise DuplicateRatingError("this rater already answered this query")

        self._append(self.ratings_path, [record], check=check)
        return record

    # ------------------------------------------------------------------ settings
    def agree_settings(self, mode: str, ratings_per_query: int, scale: RatingScale, started_by: str) -> None:
        """Records the run's rating settings (first caller) or refuses different ones (:class:`RatingSettingsError`,
        naming what differs and ``started_by``'s flags)."""
        settings = {"mode": mode, "ratings_per_query": int(ratings_per_query),
                    "scale": [scale.minimum, scale.maximum, scale.step]}
        lock = os.open(self.settings_path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(self.settings_path):
                write_atomic(self.settings_path, json.dumps(settings, indent=2), mode=0o600)
                return
            with open(self.settings_path, encoding="utf-8") as f:
                recorded = json.load(f)
        finally:
            os.close(lock)
        differ = [f"{k}={settings[k]!r} (the run's: {recorded.get(k)!r})" for k in settings
                  if recorded.get(k) != settings[k]]
        if differ:
            raise RatingSettingsError(
                f"{started_by} was started with {', '.join(differ)}: this run's ratings use "
                f"{os.path.relpath(self.settings_path)}; start it with the run's settings (a page and a trainer "
                "with different settings would wait on each other forever)")

    # ------------------------------------------------------------------ raters
    def raters(self) -> dict[str, str]:
        if not os.path.exists(self.raters_path):
            return {}
        with open(self.raters_path, encoding="utf-8") as f:
            return json.load(f)

    def add_raters(self, names, tokens: dict[str, str] | None = None) -> dict[str, str]:
        """Registers raters not known yet; returns ``{name: token}`` of the new ones (stored salted and hashed).
        ``tokens`` gives chosen tokens (tests, an organisation's own secrets) instead of random ones."""
        known, new = self.raters(), {}
        for name in names:
            if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"rater names are letters, digits, '-' and '_', got {name!r}")
            if name not in known:
                new[name] = (tokens or {}).get(name) or secrets.token_urlsafe(24)
                known[name] = token_hash(new[name])
        if new:
            write_atomic(self.raters_path, json.dumps(known, indent=2, sort_keys=True), mode=0o600)
        return new

    def revoke_raters(self, names) -> list[str]:
        """Removes raters: their tokens stop working at the next request (pages re-read the file each time), their
        login files are deleted; their ratings stay. Returns the names that were registered."""
        known = self.raters()
        gone = [n for n in names if n in known]
        for name in gone:
            del known[name]
            try:
                os.remove(os.path.join(self.logins_dir, f"{name}.url"))
            except FileNotFoundError:
                pass
        if gone:
            write_atomic(self.raters_path, json.dumps(known, indent=2, sort_keys=True), mode=0o600)
        return gone

    def write_logins(self, links: dict[str, str]) -> str:
        """Writes each rater's login link to ``logins/<name>.url`` (0600); returns the directory."""
        _private_dir(self.logins_dir)
        for name, link in links.items():
            write_atomic(os.path.join(self.logins_dir, f"{name}.url"), link + "\n", mode=0o600)
        return self.logins_dir


def latest_queue_times(queue: list[dict]) -> dict[str, float]:
    """``{key: time of its latest queue line}``: ratings of a requeued query older than this no longer count."""
    out: dict[str, float] = {}
    for q in queue:
        out[q["key"]] = max(out.get(q["key"], 0.0), float(q["time"]))
    return out


def summarize(ratings: list[dict], since: dict[str, float] | None = None) -> dict[str, dict]:
    """Per query key: ``count`` (ratings, comparisons and skips it took part in), ``values`` (scores given),
    ``compared`` (comparisons it was in that were not skipped), ``skips``, ``raters`` (who rated it) and ``pairs``
    (``(rater, other key)`` comparisons it was in). ``since``: ``{key: latest queue time}``; a skip older than its
    query's latest queue line is left out (the query was asked again: :meth:`RatingFiles.add_queries`)."""
    since = since or {}
    out: dict[str, dict] = {}

    def entry(key):
        return out.setdefault(key, {"count": 0, "values": [], "compared": 0, "skips": 0, "raters": set(),
                                    "pairs": set()})

    for r in ratings:
        requeued = max(since.get(r["key"], 0.0), since.get(r.get("other"), 0.0) if "other" in r else 0.0)
        if r["value"] is None and r["time"] < requeued:
            continue
        s = entry(r["key"])
        s["count"] += 1
        s["raters"].add(r["rater"])
        if r["value"] is None:
            s["skips"] += 1
        elif "other" not in r:
            s["values"].append(float(r["value"]))
        if "other" in r:
            o = entry(r["other"])
            o["count"] += 1
            o["raters"].add(r["rater"])
            o["skips"] += r["value"] is None
            s["compared"] += r["value"] is not None
            o["compared"] += r["value"] is not None
            s["pairs"].add((r["rater"], r["other"]))
            o["pairs"].add((r["rater"], r["key"]))
    return out


def query_key(png: bytes, prompt: str) -> str:
    return hashlib.sha256(png + b"\0" + prompt.encode("utf-8")).hexdigest()[:32]


__all__ = ["RatingScale", "RatingFiles", "RATINGS_DIR", "RATING_MODES", "query_key", "summarize", "token_matches",
           "latest_queue_times", "DuplicateRatingError", "RatingSettingsError",
           "token_hash"]
