"""People as the oracle: the rating queue on disk that the web page serves (:mod:`.rating_server`) and
:class:`~hf_control_ft.feedback.human_oracle.HumanOracle` waits on.

One run's files, under ``<output_dir>/ratings/``:

* ``queue.jsonl``: one line per query to rate, ``{"key", "prompt", "round", "time"}``; ``images/<key>.png`` its
  image. ``key`` is the SHA-256 of the PNG and the prompt, so the same sample asked again after a restart is
  the same query: its ratings are reused and nobody is asked twice.
* ``ratings.jsonl``: one line per submission, appended under an exclusive lock and flushed to disk the moment it
  is submitted: ``{"key", "rater", "value"`` (``null`` for a skip) ``, "time", "assignment"}``. The trainer turns
  a query's ratings into its answer (the mean) and stores it in the feedback dataset as soon as the query has
  ``ratings_per_query`` of them.
* ``raters.json``: ``{name: sha256(token)}`` (mode 0600); tokens themselves are never stored or logged.

Several processes may read and append (a trainer and a separate ``hf-control-ft rate`` page): appends take an
``fcntl`` lock and every reader reads complete lines only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import secrets
import time
from dataclasses import dataclass

from ..utils.versioned_dir import write_atomic

RATINGS_DIR = "ratings"
RATING_MODES = ("score", "pairwise")


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


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class RatingFiles:
    """The ``ratings/`` directory of a run: the queue, the ratings log and the raters (see the module docstring)."""

    def __init__(self, output_dir: str):
        self.directory = os.path.join(output_dir, RATINGS_DIR)
        self.images_dir = os.path.join(self.directory, "images")
        self.queue_path = os.path.join(self.directory, "queue.jsonl")
        self.ratings_path = os.path.join(self.directory, "ratings.jsonl")
        self.raters_path = os.path.join(self.directory, "raters.json")
        os.makedirs(self.images_dir, exist_ok=True)

    # ------------------------------------------------------------------ appends (locked, flushed)
    def _append(self, path: str, records: list[dict]) -> None:
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def read_lines(path: str, offset: int = 0) -> tuple[list[dict], int]:
        """Complete JSON lines of ``path`` from byte ``offset``; returns them and the offset after the last one
        (a line being written, without its newline yet, is left for the next read)."""
        if not os.path.exists(path):
            return [], offset
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        records = [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line.strip()]
        return records, offset + end

    def add_queries(self, entries: list[tuple[str, bytes, str, int]]) -> None:
        """Queues ``(key, png, prompt, round)`` entries not queued yet (images written before the queue line)."""
        queued = {r["key"] for r in self.read_lines(self.queue_path)[0]}
        new = []
        for key, png, prompt, round_index in entries:
            if key in queued:
                continue
            queued.add(key)
            path = os.path.join(self.images_dir, f"{key}.png")
            if not os.path.exists(path):
                write_atomic(path, png)
            new.append({"key": key, "prompt": prompt, "round": int(round_index), "time": time.time()})
        if new:
            self._append(self.queue_path, new)

    def add_rating(self, key: str, rater: str, value: float | None, assignment: str, other: str | None = None) -> dict:
        """One submission; pairwise: ``key`` was shown with ``other`` and ``value`` is 1 when ``key`` was preferred,
        0 when ``other`` was (``None``: skipped)."""
        record = {"key": key, "rater": rater, "value": value, "time": time.time(), "assignment": assignment}
        if other is not None:
            record["other"] = other
        self._append(self.ratings_path, [record])
        return record

    # ------------------------------------------------------------------ raters
    def raters(self) -> dict[str, str]:
        if not os.path.exists(self.raters_path):
            return {}
        with open(self.raters_path, encoding="utf-8") as f:
            return json.load(f)

    def add_raters(self, names, tokens: dict[str, str] | None = None) -> dict[str, str]:
        """Registers raters not known yet; returns ``{name: token}`` of the new ones (shown once, stored hashed).
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


def summarize(ratings: list[dict]) -> dict[str, dict]:
    """Per query key: ``count`` (ratings, comparisons and skips it took part in), ``values`` (scores given),
    ``skips``, ``raters`` (who rated it) and ``pairs`` (``(rater, other key)`` comparisons it was in)."""
    out: dict[str, dict] = {}

    def entry(key):
        return out.setdefault(key, {"count": 0, "values": [], "skips": 0, "raters": set(), "pairs": set()})

    for r in ratings:
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
            s["pairs"].add((r["rater"], r["other"]))
            o["pairs"].add((r["rater"], r["key"]))
    return out


def query_key(png: bytes, prompt: str) -> str:
    return hashlib.sha256(png + b"\0" + prompt.encode("utf-8")).hexdigest()[:32]


__all__ = ["RatingScale", "RatingFiles", "RATINGS_DIR", "RATING_MODES", "query_key", "summarize",
           "token_hash"]
