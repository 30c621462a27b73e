"""The feedback dataset: every oracle query and answer, persisted crash-safely with 🤗 ``datasets``.

Oracle answers are the most expensive data in the system, so the dataset is written *before* anything else
uses them, and samples are written *before* they are sent (write-ahead):

1. :meth:`FeedbackDataset.add_pending` appends a round's samples with ``status="pending"`` and persists;
2. after every oracle batch, :meth:`FeedbackDataset.record` fills ``value``/``status``/``error``/``attempts``/
   ``timestamp`` of those rows and persists again.

A process killed at any point therefore restarts with every answer it had persisted, and the samples still
``pending`` are exactly the ones whose answer was never recorded: resuming queries those and nothing else (no
sample is asked twice once its answer is stored, and no new samples replace them).

On disk (``directory``)::

    current                 # one line: the name of the live version ("v000012"), replaced with os.replace
    versions/v000012/       # Dataset.save_to_disk output + feedback_meta.json
    versions/v000011/       # the previous version is kept until the next switch

A version directory is written under a temporary name, renamed, and only then made live by atomically
replacing ``current``; a crash leaves either the old or the new version live, never a half-written one (a
``datasets`` dataset cannot overwrite the directory it was loaded from, hence versions).

Columns: ``query_index`` (int64, unique, in submission order), ``round`` (1-based), ``batch`` (oracle batch in
the round, -1 while pending), ``sample`` (flattened float32; ``sample_shape`` in the metadata), ``prompt``
(str, "" if none), ``value`` (float64, NaN unless ok), ``status`` ("pending" / "ok" / "failed"), ``error``
(str), ``attempts`` (int), ``timestamp`` (UNIX seconds of the answer, NaN while pending).
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
from datasets import Dataset, Features, Value, load_from_disk
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from ..utils.versioned_dir import VersionedDirectory
from .oracle import FAILED, OK, PENDING, OracleAnswer

try:  # datasets >= 4
    from datasets import List
except ImportError:  # datasets 3.x: Sequence of a scalar is the variable-length list
    from datasets import Sequence as List

CURRENT = "current"
VERSIONS = "versions"
META_NAME = "feedback_meta.json"
FEATURES = Features({
    "query_index": Value("int64"),
    "round": Value("int32"),
    "batch": Value("int32"),
    "sample": List(Value("float32")),
    "prompt": Value("string"),
    "value": Value("float64"),
    "status": Value("string"),
    "error": Value("string"),
    "attempts": Value("int32"),
    "timestamp": Value("float64"),
})


class FeedbackDataset:
    """All oracle queries of a run, persisted after every change.

    Args:
        directory: where versions live (created if missing). If it already holds a dataset, it is loaded.
        sample_shape: shape of one sample; must match a loaded dataset's.
    """

    def __init__(self, directory: str, sample_shape):
        self.directory = directory
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self.columns: dict[str, list] = {name: [] for name in FEATURES}
        self.version = 0
        self.store = VersionedDirectory(os.path.join(directory, VERSIONS), os.path.join(directory, CURRENT))
        self._load()

    # ------------------------------------------------------------------ persistence
    def _load(self) -> None:
        version_dir = self.store.current()
        if version_dir is None:
            return
        with open(os.path.join(version_dir, META_NAME), encoding="utf-8") as f:
            meta = json.load(f)
        if tuple(meta["sample_shape"]) != self.sample_shape:
            raise ValueError(f"feedback dataset in {self.directory} has sample_shape {tuple(meta['sample_shape'])}, "
                             f"expected {self.sample_shape}")
        ds = load_from_disk(version_dir, keep_in_memory=True)
        self.columns = {name: list(ds[name]) for name in FEATURES}
        self.version = int(meta["version"])

    def persist(self) -> str:
        """Writes a new version and makes it live atomically; returns its directory."""
        self.version += 1
        name = f"v{self.version:06d}"
        tmp = self.store.begin(name)
        quiet = not are_progress_bars_disabled()
        if quiet:  # one bar per oracle batch would flood the logs
            disable_progress_bars()
        try:
            self.to_dataset().save_to_disk(tmp)
        finally:
            if quiet:
                enable_progress_bars()
        with open(os.path.join(tmp, META_NAME), "w", encoding="utf-8") as f:
            json.dump({"sample_shape": list(self.sample_shape), "version": self.version,
                       "num_rows": len(self)}, f)
            f.flush()
            os.fsync(f.fileno())
        return self.store.commit(name, keep={f"v{self.version - 1:06d}"})

    # ------------------------------------------------------------------ content
    def __len__(self) -> int:
        return len(self.columns["query_index"])

    def to_dataset(self) -> Dataset:
        """The rows as a ``datasets.Dataset`` (in memory)."""
        return Dataset.from_dict(self.columns, features=FEATURES)

    def rows(self, round_index: int | None = None, status: str | None = None) -> list[int]:
        """Row positions, optionally filtered by round and status."""
        return [i for i in range(len(self))
                if (round_index is None or self.columns["round"][i] == round_index)
                and (status is None or self.columns["status"][i] == status)]

    def num_submitted(self, round_index: int) -> int:
        """Samples written for a round (pending, ok or failed): what counts against its budget."""
        return len(self.rows(round_index))

    def add_pending(self, samples: torch.Tensor, round_index: int, prompts: list[str] | None = None) -> list[int]:
        """Appends samples ``(B, *sample_shape)`` as pending queries of ``round_index`` and persists.

        Returns their ``query_index`` values.
        """
        if tuple(samples.shape[1:]) != self.sample_shape:
            raise ValueError(f"samples of shape {tuple(samples.shape[1:])}, expected {self.sample_shape}")
        B = samples.shape[0]
        if prompts is not None and len(prompts) != B:
            raise ValueError(f"{len(prompts)} prompts for {B} samples")
        start = (max(self.columns["query_index"]) + 1) if len(self) else 0
        flat = samples.detach().cpu().float().reshape(B, -1).tolist()
        new = list(range(start, start + B))
        self.columns["query_index"].extend(new)
        self.columns["round"].extend([int(round_index)] * B)
        self.columns["batch"].extend([-1] * B)
        self.columns["sample"].extend(flat)
        self.columns["prompt"].extend(list(prompts) if prompts is not None else [""] * B)
        self.columns["value"].extend([math.nan] * B)
        self.columns["status"].extend([PENDING] * B)
        self.columns["error"].extend([""] * B)
        self.columns["attempts"].extend([0] * B)
        self.columns["timestamp"].extend([math.nan] * B)
        self.persist()
        return new

    def _position(self, query_index: int) -> int:
        # query indices are contiguous from 0 in submission order
        pos = int(query_index)
        if not (0 <= pos < len(self)) or self.columns["query_index"][pos] != query_index:
            raise KeyError(f"no query with index {query_index}")
        return pos

    def record(self, query_indices: list[int], answers: list[OracleAnswer], batch_index: int) -> None:
        """Stores the answers of one oracle batch and persists (call once per batch, right after the oracle)."""
        if len(query_indices) != len(answers):
            raise ValueError(f"{len(answers)} answers for {len(query_indices)} queries")
        now = time.time()
        for q, a in zip(query_indices, answers):
            pos = self._position(q)
            if self.columns["status"][pos] != PENDING:
                raise ValueError(f"query {q} already has status {self.columns['status'][pos]!r}: answers are "
                                 "never overwritten")
            if a.status not in (OK, FAILED):
                raise ValueError(f"answer status must be {OK!r} or {FAILED!r}, got {a.status!r}")
            self.columns["value"][pos] = float(a.value) if a.status == OK else math.nan
            self.columns["status"][pos] = a.status
            self.columns["error"][pos] = a.error
            self.columns["attempts"][pos] = int(a.attempts)
            self.columns["timestamp"][pos] = now
            self.columns["batch"][pos] = int(batch_index)
        self.persist()

    def pending(self, round_index: int | None = None) -> list[int]:
        """``query_index`` of the samples written but never answered (in order)."""
        return [self.columns["query_index"][i] for i in self.rows(round_index, PENDING)]

    def samples(self, query_indices: list[int]) -> torch.Tensor:
        """``(len(query_indices), *sample_shape)`` float32 samples."""
        rows = [self.columns["sample"][self._position(q)] for q in query_indices]
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), *self.sample_shape)

    def prompts(self, query_indices: list[int]) -> list[str]:
        return [self.columns["prompt"][self._position(q)] for q in query_indices]

    def next_batch_index(self, round_index: int) -> int:
        batches = [self.columns["batch"][i] for i in self.rows(round_index)]
        return max(batches, default=-1) + 1

    def training_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: the answered samples ``(N, *sample_shape)`` and their values ``(N,)`` (failed excluded)."""
        rows = self.rows(status=OK)
        x = torch.tensor([self.columns["sample"][i] for i in rows], dtype=torch.float32)
        y = torch.tensor([self.columns["value"][i] for i in rows], dtype=torch.float32)
        return x.reshape(len(rows), *self.sample_shape), y

    def summary(self) -> dict:
        st = self.columns["status"]
        return {"feedback/rows": len(self), "feedback/ok": st.count(OK), "feedback/failed": st.count(FAILED),
                "feedback/pending": st.count(PENDING)}

    # ------------------------------------------------------------------ Hub
    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None, endpoint: str | None = None):
        """Pushes the live rows to the Hub as a dataset repo (``Dataset.push_to_hub``, Parquet); returns the
        ``CommitInfo``.

        ``sample_shape`` is written into the dataset description so ``sample`` can be reshaped. ``endpoint``: a
        Hub other than ``HF_ENDPOINT`` (``datasets`` reads its endpoint from ``datasets.config.HF_ENDPOINT``,
        which is set to ``endpoint`` for the duration of the push and restored after).
        """
        import datasets.config

        ds = self.to_dataset()
        ds.info.description = (f"hf_control_ft SEIKO feedback: oracle queries and answers. sample_shape="
                               f"{list(self.sample_shape)}; status in (pending, ok, failed).")
        previous = datasets.config.HF_ENDPOINT
        if endpoint is not None:
            datasets.config.HF_ENDPOINT = endpoint.rstrip("/")
        try:
            return ds.push_to_hub(repo_id, private=private, token=token,
                                  commit_message=commit_message or f"feedback: {len(self)} queries")
        finally:
            datasets.config.HF_ENDPOINT = previous
