"""``HumanOracle``: SEIKO's oracle answered by people on the rating page (``docs/algorithms.md`` §12)."""

from __future__ import annotations

import math
import time

import torch

from ..utils.images import to_png
from .oracle import FAILED, OK, OracleAnswer
from .preferences import bradley_terry
from .rating import RATING_MODES, RatingFiles, RatingScale, latest_queue_times, query_key, summarize
from .rating_server import start_rating_server


class HumanOracle:
    """An oracle answered by people through the rating page.

    The SEIKO trainer queues a round's decoded samples (:meth:`enqueue`: image + prompt) and takes each query's
    answer from :meth:`answers` as soon as it has ``ratings_per_query`` ratings or skips: the mean rating
    (``ok``), or ``failed`` when everybody asked skipped it. The trainer stores each answer in the feedback
    dataset at once; every single rating is already on disk in ``ratings.jsonl`` when it is submitted. Pairwise:
    the values of a round come when its last comparison does, fitted with every earlier round's comparisons on one
    scale; :meth:`current_values` gives the refitted values of the earlier rounds too.

    Args:
        output_dir: the SEIKO run directory (``config.output_dir``).
        scale: :class:`RatingScale` (default 1..10 in steps of 1).
        ratings_per_query: ratings averaged into one answer; each by a different rater.
        serve: start the rating page in this process (on the first call) at ``host:port``
            (:class:`~hf_control_ft.feedback.rating_server.RatingServer`); else run ``hf-control-ft rate``.
        raters: names to register (their login links are written to ``ratings/logins/<name>.url`` when the page
            starts), or ``{name: token}``.
        value_range: the range of the samples the trainer passes (decoded images: ``(0, 1)``).
        poll_interval: seconds between looks at the ratings log while waiting.
    """

    streams_answers = True
    __name__ = "human_raters"

    def __init__(self, output_dir: str, scale: RatingScale | None = None, ratings_per_query: int = 1,
                 serve: bool = False, host: str = "127.0.0.1", port: int = 7860, raters=None,
                 value_range: tuple[float, float] = (0.0, 1.0), poll_interval: float = 0.5, mode: str = "score"):
        if not isinstance(ratings_per_query, int) or ratings_per_query < 1:
            raise ValueError(f"ratings_per_query must be an int >= 1, got {ratings_per_query!r}")
        if mode not in RATING_MODES:
            raise ValueError(f"mode must be one of {RATING_MODES}, got {mode!r}")
        self.mode = mode
        self.output_dir = output_dir
        self.scale = scale or RatingScale()
        self.ratings_per_query = ratings_per_query
        self.serve, self.host, self.port = serve, host, port
        self.raters = raters
        self.value_range = value_range
        self.poll_interval = poll_interval
        self.server = None
        self._settings_agreed = False

    def start_server(self):
        """Starts the rating page in a daemon thread (once); returns the server."""
        if self.server is None:
            try:
                self.server = self._serve()
            except OSError as err:
                raise OSError(f"cannot serve the rating page on {self.host}:{self.port}: "
                              f"{err.strerror or err} (choose another port: --rating_port / port=)") from None
        return self.server

    #: how the trainer's rating settings are named when they differ from the run's
    STARTED_BY = "the trainer (--rating_mode, --ratings_per_query, --rating_scale)"

    def _serve(self):
        return start_rating_server(self.output_dir, scale=self.scale, ratings_per_query=self.ratings_per_query,
                                   host=self.host, port=self.port, raters=self.raters, mode=self.mode,
                                   started_by=self.STARTED_BY)

    def enqueue(self, samples: torch.Tensor, prompts: list[str] | None = None, round_index: int = 0,
                query_indices: list[int] | None = None) -> list[str]:
        """Queues the samples for rating (a sample queued before keeps its ratings); returns their keys.
        ``query_indices``: their rows in the feedback dataset (pairwise: lets :meth:`current_values` name them)."""
        if not self._settings_agreed:  # a page with other settings would leave this trainer waiting forever
            RatingFiles(self.output_dir).agree_settings(self.mode, self.ratings_per_query, self.scale, self.STARTED_BY)
            self._settings_agreed = True
        if self.serve:
            self.start_server()
        if samples.dim() == 5:
            raise ValueError(f"the rating page shows images; got videos of shape {tuple(samples.shape)} (B, F, 3, H, W): "
                             "people rating videos is not supported yet (use a video reward or a served oracle)")
        prompts = list(prompts) if prompts is not None else [""] * samples.shape[0]
        pngs = [to_png(s, self.value_range) for s in samples]
        keys = [query_key(png, p) for png, p in zip(pngs, prompts)]
        queries = list(query_indices) if query_indices is not None else [None] * len(keys)
        RatingFiles(self.output_dir).add_queries([(k, png, p, round_index, q)
                                                  for k, png, p, q in zip(keys, pngs, prompts, queries)])
        return keys

    def answers(self, keys: list[str]):
        """Yields ``(i, OracleAnswer)`` for ``keys[i]`` as each query is completed (any order); blocks meanwhile.
        Pairwise: all at once, when every query took part in ``ratings_per_query`` comparisons (its value is the
        Bradley–Terry value of the comparisons among ``keys``)."""
        files = RatingFiles(self.output_dir)
        waiting = dict(enumerate(keys))
        ratings, offset = [], 0
        while waiting:
            new, offset = files.read_lines(files.ratings_path, offset)
            ratings.extend(new)
            summary = summarize(ratings, latest_queue_times(files.read_lines(files.queue_path)[0]))
            done = [i for i, key in waiting.items() if summary.get(key, {}).get("count", 0) >= self.ratings_per_query]
            if self.mode == "pairwise":
                if len(done) == len(waiting):
                    yield from self._preference_answers(keys, ratings, summary, files)
                    return
            for i in done:
                s = summary[waiting.pop(i)]
                if s["values"]:
                    yield i, OracleAnswer(sum(s["values"]) / len(s["values"]), OK, "", 1)
                else:
                    yield i, OracleAnswer(math.nan, FAILED, f"skipped by {s['skips']} rater(s)", 1)
            if waiting:
                time.sleep(self.poll_interval)

    @staticmethod
    def _fit(files: RatingFiles, ratings: list[dict]) -> tuple[dict[str, float], dict[str, dict]]:
        """Bradley–Terry values of every query compared so far, all rounds on one scale (``docs/algorithms.md``
        §12): ``({key: value}, {key: its first queue line})``."""
        first: dict[str, dict] = {}
        for q in files.read_lines(files.queue_path)[0]:
            first.setdefault(q["key"], q)
        compared = [r for r in ratings if r.get("other") is not None and r["value"] is not None
                    and r["key"] in first and r["other"] in first]
        keys = sorted({k for r in compared for k in (r["key"], r["other"])})
        index = {k: i for i, k in enumerate(keys)}
        values = bradley_terry(len(keys), [(index[r["key"]], index[r["other"]], r["value"]) for r in compared],
                               groups=[first[k]["round"] for k in keys])
        return dict(zip(keys, values)), first

    def _preference_answers(self, keys, ratings, summary, files):
        values, _ = self._fit(files, ratings)
        for i, key in enumerate(keys):
            if key in values:
                yield i, OracleAnswer(values[key], OK, "", 1)
            else:
                yield i, OracleAnswer(math.nan, FAILED, f"skipped in all {summary[key]['count']} comparisons", 1)

    def current_values(self) -> dict[int, float]:
        """Pairwise: ``{query_index: value}`` of every query compared so far, refitted over all rounds' comparisons
        (a later round's comparisons with earlier queries move those too). The trainer stores the changed values
        of earlier rounds as a new version of their rows. Score mode: ``{}`` (a score never changes)."""
        if self.mode != "pairwise":
            return {}
        files = RatingFiles(self.output_dir)
        values, first = self._fit(files, files.read_lines(files.ratings_path)[0])
        return {int(first[k]["query"]): v for k, v in values.items() if "query" in first[k]}

    def stream(self, samples: torch.Tensor, prompts: list[str] | None = None, round_index: int = 0):
        """:meth:`enqueue` then :meth:`answers`."""
        yield from self.answers(self.enqueue(samples, prompts, round_index))

    def __call__(self, samples: torch.Tensor, prompts=None):
        """Plain-oracle form: blocks until every sample is answered; failed ones are NaN."""
        values = [math.nan] * samples.shape[0]
        for i, answer in self.stream(samples, prompts):
            values[i] = answer.value
        return values


__all__ = ["HumanOracle"]
