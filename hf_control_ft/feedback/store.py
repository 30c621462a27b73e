"""The feedback dataset: every oracle query and answer, persisted crash-safely in append-only shards.

Oracle answers are the most expensive data in the system, so they are written *before* anything else uses
them, and samples are written *before* they are sent (write-ahead):

1. :meth:`FeedbackDataset.add_pending` appends a round's samples with ``status="pending"``;
2. after every oracle batch, :meth:`FeedbackDataset.record` stores ``value``/``status``/``error``/``attempts``/
   ``timestamp`` of those queries.

Each of these writes **one new shard** holding only the rows it adds or updates, then atomically replaces the
manifest that lists the shards, so the cost of a write is proportional to the batch, not to the dataset.
On disk (``directory``)::

    manifest.json                 # {"format": 2, "sample_shape": [...], "shards": [...]}; os.replace'd
    shards/shard-000001.parquet   # pending rows of a round: query_index, round, prompt, sample (float32)
    shards/shard-000002.parquet   # answers of one oracle batch: query_index, batch, value, status, error, ...

A shard is written under a temporary name, fsynced and renamed before the manifest names it, and shards are
never rewritten or deleted. A process killed at any point restarts with every answer whose shard the manifest
listed; the samples still ``pending`` (or ``failed`` with attempts left) are exactly the ones to ask.

**Damage.** A missing or unreadable manifest is rebuilt from the shards on disk (a warning says so); shards
renamed into place after the manifest's last one (a writer killed between the two writes) are adopted; a listed
shard that is missing or unreadable stops the load with :class:`FeedbackStoreError` naming the file (its rows
may be answers: nothing is dropped silently). A directory in the earlier versioned format
(``current`` + ``versions/``) is converted to shards on first open.

In memory: samples in one float32 tensor ``(N, *sample_shape)``, per-row fields in lists, per-round indexes.

:func:`hf_control_ft.feedback.reader.load_feedback` reads a run's feedback as a ``datasets.Dataset`` with the
columns ``query_index, round, batch, status, value, error, attempts, prompt, sample`` (plus ``timestamp``): the
supported way to read it.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..serialization.saved import HubPushError, mask_token
from ..utils.versioned_dir import fsync_dir, write_atomic
from .oracle import FAILED, OK, PENDING, OracleAnswer
from .recovery import SHARD_PATTERN as _SHARD
from .recovery import migrate_versioned, remove_temporaries, unlisted_shards

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARDS = "shards"
FORMAT = 2
COLUMNS = ("query_index", "round", "batch", "status", "value", "error", "attempts", "prompt", "sample", "timestamp")


class FeedbackStoreError(RuntimeError):
    """The feedback directory is damaged in a way that could lose answers; the message names the file."""


class FeedbackDataset:
    """All oracle queries of a run, persisted after every change (one shard per change).

    Args:
        directory: where the shards and the manifest live (created if missing). An existing dataset is loaded.
        sample_shape: shape of one sample; must match a loaded dataset's.
    """

    def __init__(self, directory: str, sample_shape, read_only: bool = False):
        self.directory = directory
        self.read_only = read_only
        self.sample_shape = tuple(int(d) for d in sample_shape)
        self._numel = math.prod(self.sample_shape)
        self.version = 0  # number of shards written (the manifest's length)
        self._shards: list[str] = []
        self._chunks: list[torch.Tensor] = []  # float32 sample blocks, in query order
        self._offsets: list[int] = []  # first position of each block
        self._next_seq: int | None = None
        self.columns: dict[str, list] = {name: [] for name in COLUMNS if name != "sample"}
        self._by_round: dict[int, list[int]] = {}
        if not read_only:
            os.makedirs(os.path.join(directory, SHARDS), exist_ok=True)
            remove_temporaries(self.directory)
        elif not os.path.isdir(directory):
            raise FeedbackStoreError(f"no feedback dataset in {directory}")
        self._load()

    # ------------------------------------------------------------------ loading
    def _manifest_path(self) -> str:
        return os.path.join(self.directory, MANIFEST)

    def _shards_on_disk(self) -> list[str]:
        shard_dir = os.path.join(self.directory, SHARDS)
        return sorted(n for n in os.listdir(shard_dir) if _SHARD.match(n)) if os.path.isdir(shard_dir) else []

    def _read_manifest(self) -> tuple[list[str] | None, bool]:
        """``(shard names, rebuilt)``: the manifest's list, or -- when it is missing or damaged -- the shards on
        disk (``rebuilt=True``); ``(None, False)`` for a directory without either."""
        path = self._manifest_path()
        on_disk = self._shards_on_disk()
        if not os.path.exists(path):
            if on_disk:
                logger.warning("feedback manifest %s is missing; rebuilding it from the %d shards on disk", path,
                               len(on_disk))
            return (on_disk, True) if on_disk else (None, False)
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
            shards, shape = list(meta["shards"]), tuple(meta["sample_shape"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            if not on_disk:
                raise FeedbackStoreError(f"feedback manifest {path} is damaged ({err}) and no shard is on disk to "
                                         "rebuild it from") from None
            logger.warning("feedback manifest %s is damaged (%s); rebuilding it from the %d shards on disk", path,
                           err, len(on_disk))
            return on_disk, True
        if shape != self.sample_shape:
            raise ValueError(f"feedback dataset in {self.directory} has sample_shape {shape}, expected "
                             f"{self.sample_shape}")
        return shards, False

    def _load(self) -> None:
        shards, rebuilt = self._read_manifest()
        if shards is None:
            self._migrate_versioned()
            return
        if not rebuilt:
            orphans = unlisted_shards(self.directory, shards, self._shards_on_disk())
            shards, rebuilt = shards + orphans, bool(orphans)
        for position, name in enumerate(shards):
            path = os.path.join(self.directory, SHARDS, name)
            try:
                table = pq.read_table(path)
            except Exception as err:  # noqa: BLE001 - missing or truncated: name it, never skip answers silently
                intact = shards[:position]
                raise FeedbackStoreError(
                    f"feedback shard {path} is missing or damaged ({type(err).__name__}: {err}); the intact shards "
                    f"before it are {intact[-3:]}{' ...' if len(intact) > 3 else ''}. Restore the file (its rows may "
                    "hold oracle answers) or move the run directory away to start over") from None
            self._apply(table)
        self._shards = list(shards)
        self.version = len(shards)
        if rebuilt and not self.read_only:  # a reader never writes; the writer holds the run lock
            self._write_manifest()

    def _migrate_versioned(self) -> None:
        migrate_versioned(self)

    def _apply(self, table: pa.Table) -> None:
        cols = table.to_pydict()
        if "sample" in cols:  # pending rows of a round (and the converted format: a full snapshot)
            flat = table.column("sample").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            samples = torch.from_numpy(flat.astype("float32", copy=False).copy()).reshape(-1, *self.sample_shape)
            new = [i for i, q in enumerate(cols["query_index"]) if q >= len(self)]
            if new:
                self._append_rows([cols["query_index"][i] for i in new], [cols["round"][i] for i in new],
                                  [cols["prompt"][i] for i in new], samples[new])
        if "status" in cols:
            self._update_rows(cols["query_index"], cols["batch"], cols["value"], cols["status"], cols["error"],
                              cols["attempts"], cols["timestamp"])

    # ------------------------------------------------------------------ writing
    def _table(self, positions, with_samples: bool, samples: torch.Tensor | None = None) -> pa.Table:
        """Rows at ``positions`` as an Arrow table: pending rows (round, prompt, sample: ``samples`` if given,
        else looked up) or answer rows (batch, value, status, error, attempts, timestamp)."""
        positions = list(positions)
        data = {"query_index": pa.array([self.columns["query_index"][p] for p in positions], pa.int64())}
        if with_samples:
            data["round"] = pa.array([self.columns["round"][p] for p in positions], pa.int32())
            data["prompt"] = pa.array([self.columns["prompt"][p] for p in positions], pa.string())
            if samples is None:
                samples = self._gather(positions) if positions else torch.zeros((0, *self.sample_shape))
            flat = samples.reshape(-1).numpy()
            data["sample"] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), self._numel)
        else:
            for name, kind in (("batch", pa.int32()), ("value", pa.float64()), ("status", pa.string()),
                               ("error", pa.string()), ("attempts", pa.int32()), ("timestamp", pa.float64())):
                data[name] = pa.array([self.columns[name][p] for p in positions], kind)
        return pa.table(data)

    def _write_shard(self, table: pa.Table) -> None:
        if self.read_only:
            raise FeedbackStoreError(f"the feedback dataset in {self.directory} was opened read-only")
        if self._next_seq is None:  # once per process: never reuse a number a file on disk already has
            names = self._shards_on_disk() + self._shards
            self._next_seq = max([int(_SHARD.match(n).group(1)) for n in names], default=0) + 1
        name = f"shard-{self._next_seq:06d}.parquet"
        self._next_seq += 1
        shard_dir = os.path.join(self.directory, SHARDS)
        tmp = os.path.join(shard_dir, f".{name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(shard_dir, name))
        fsync_dir(shard_dir)
        self._shards.append(name)
        self.version = len(self._shards)
        self._write_manifest()

    def _write_manifest(self) -> None:
        write_atomic(self._manifest_path(), json.dumps({"format": FORMAT, "sample_shape": list(self.sample_shape),
                                                         "num_rows": len(self), "shards": self._shards}))

    # ------------------------------------------------------------------ in-memory rows
    def _append_rows(self, query_indices, rounds, prompts, samples: torch.Tensor) -> None:
        start = len(self)
        for offset, q in enumerate(query_indices):
            if int(q) != start + offset:
                raise FeedbackStoreError(f"feedback rows in {self.directory} are not contiguous: expected query "
                                         f"{start + offset}, found {q}")
        n = len(query_indices)
        self.columns["query_index"].extend(int(q) for q in query_indices)
        self.columns["round"].extend(int(r) for r in rounds)
        self.columns["prompt"].extend(p or "" for p in prompts)
        self.columns["batch"].extend([-1] * n)
        self.columns["value"].extend([math.nan] * n)
        self.columns["status"].extend([PENDING] * n)
        self.columns["error"].extend([""] * n)
        self.columns["attempts"].extend([0] * n)
        self.columns["timestamp"].extend([math.nan] * n)
        for pos, r in zip(range(start, start + n), rounds):
            self._by_round.setdefault(int(r), []).append(pos)
        self._offsets.append(start)
        self._chunks.append(samples.detach().to("cpu", torch.float32).reshape(n, *self.sample_shape).contiguous())

    def _update_rows(self, query_indices, batches, values, statuses, errors, attempts, timestamps) -> None:
        for q, b, v, s, e, a, t in zip(query_indices, batches, values, statuses, errors, attempts, timestamps):
            pos = self._position(q)
            self.columns["batch"][pos] = int(b)
            self.columns["value"][pos] = float(v) if v is not None else math.nan
            self.columns["status"][pos] = s
            self.columns["error"][pos] = e or ""
            self.columns["attempts"][pos] = int(a)
            self.columns["timestamp"][pos] = float(t) if t is not None else math.nan

    def all_samples(self) -> torch.Tensor:
        """``(N, *sample_shape)`` float32: every stored sample (the blocks are merged into one, in place)."""
        if len(self._chunks) != 1:
            merged = torch.cat(self._chunks) if self._chunks else torch.zeros((0, *self.sample_shape))
            self._chunks, self._offsets = [merged], [0]
        return self._chunks[0]

    def _gather(self, positions: list[int]) -> torch.Tensor:
        """Samples at ``positions`` without merging the blocks (cost proportional to ``len(positions)``)."""
        out = []
        for pos in positions:
            c = bisect.bisect_right(self._offsets, pos) - 1
            out.append(self._chunks[c][pos - self._offsets[c]])
        return torch.stack(out) if out else torch.zeros((0, *self.sample_shape))

    def _position(self, query_index: int) -> int:
        # query indices are contiguous from 0 in submission order
        pos = int(query_index)
        if not (0 <= pos < len(self)):
            raise KeyError(f"no query with index {query_index}")
        return pos

    # ------------------------------------------------------------------ content
    def __len__(self) -> int:
        return len(self.columns["query_index"])

    def to_dataset(self):
        """The rows as a ``datasets.Dataset`` (in memory), with the columns of :data:`COLUMNS`."""
        from datasets import Dataset

        data = {name: self.columns[name] for name in COLUMNS if name != "sample"}
        samples = self._table(range(len(self)), True, samples=self.all_samples()).column("sample")
        table = pa.table(data).append_column("sample", samples)
        return Dataset(table.select(list(COLUMNS)))

    def rows(self, round_index: int | None = None, status: str | None = None) -> list[int]:
        """Row positions, optionally filtered by round and status."""
        positions = self._by_round.get(round_index, []) if round_index is not None else range(len(self))
        return [i for i in positions if status is None or self.columns["status"][i] == status]

    def num_submitted(self, round_index: int) -> int:
        """Samples written for a round (pending, ok or failed): what counts against its budget."""
        return len(self._by_round.get(round_index, []))

    def add_pending(self, samples: torch.Tensor, round_index: int, prompts: list[str] | None = None) -> list[int]:
        """Appends samples ``(B, *sample_shape)`` as pending queries of ``round_index`` (one shard); returns their
        ``query_index`` values."""
        if tuple(samples.shape[1:]) != self.sample_shape:
            raise ValueError(f"samples of shape {tuple(samples.shape[1:])}, expected {self.sample_shape}")
        B = samples.shape[0]
        if prompts is not None and len(prompts) != B:
            raise ValueError(f"{len(prompts)} prompts for {B} samples")
        start = len(self)
        new = list(range(start, start + B))
        self._append_rows(new, [int(round_index)] * B, list(prompts) if prompts is not None else [""] * B, samples)
        self._write_shard(self._table(range(start, start + B), with_samples=True, samples=self._chunks[-1]))
        return new

    def record(self, query_indices: list[int], answers: list[OracleAnswer], batch_index: int) -> None:
        """Stores the answers of one oracle batch (one shard; call right after the oracle).

        A query may be answered again while it is ``failed`` (its ``attempts`` add up); an ``ok`` answer is never
        overwritten.
        """
        if len(query_indices) != len(answers):
            raise ValueError(f"{len(answers)} answers for {len(query_indices)} queries")
        now = time.time()
        positions = []
        for q, a in zip(query_indices, answers):
            pos = self._position(q)
            if self.columns["status"][pos] == OK:
                raise ValueError(f"query {q} already has an ok answer: answers are never overwritten")
            if a.status not in (OK, FAILED):
                raise ValueError(f"answer status must be {OK!r} or {FAILED!r}, got {a.status!r}")
            self.columns["value"][pos] = float(a.value) if a.status == OK else math.nan
            self.columns["status"][pos] = a.status
            self.columns["error"][pos] = a.error
            self.columns["attempts"][pos] += int(a.attempts)
            self.columns["timestamp"][pos] = now
            self.columns["batch"][pos] = int(batch_index)
            positions.append(pos)
        self._write_shard(self._table(positions, with_samples=False))

    def revalue(self, values: dict[int, float]) -> int:
        """New values of ``ok`` answers that a later fit changed (pairwise preferences, all rounds refitted on one
        scale), as one shard: the earlier values stay in the shards before it (nothing is lost; replaying the
        shards up to any point gives the values of then). Rows not ``ok`` or unchanged are left; returns how many
        rows changed."""
        now, positions = time.time(), []
        for q, v in sorted(values.items()):
            pos = self._position(q)
            if self.columns["status"][pos] != OK or not math.isfinite(v) or abs(self.columns["value"][pos] - v) < 1e-9:
                continue
            self.columns["value"][pos] = float(v)
            self.columns["timestamp"][pos] = now
            positions.append(pos)
        if positions:
            self._write_shard(self._table(positions, with_samples=False))
        return len(positions)

    def pending(self, round_index: int | None = None) -> list[int]:
        """``query_index`` of the samples written but never answered (in order)."""
        return [self.columns["query_index"][i] for i in self.rows(round_index, PENDING)]

    def retryable(self, max_attempts: int, up_to_round: int | None = None) -> list[int]:
        """``query_index`` of failed queries with fewer than ``max_attempts`` sends, rounds ``<= up_to_round``."""
        return [self.columns["query_index"][i] for i in range(len(self))
                if self.columns["status"][i] == FAILED and self.columns["attempts"][i] < max_attempts
                and (up_to_round is None or self.columns["round"][i] <= up_to_round)]

    def samples(self, query_indices: list[int]) -> torch.Tensor:
        """``(len(query_indices), *sample_shape)`` float32 samples."""
        return self._gather([self._position(q) for q in query_indices])

    def prompts(self, query_indices: list[int]) -> list[str]:
        return [self.columns["prompt"][self._position(q)] for q in query_indices]

    def next_batch_index(self, round_index: int) -> int:
        return max((self.columns["batch"][i] for i in self.rows(round_index)), default=-1) + 1

    def training_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: the answered samples ``(N, *sample_shape)`` and their values ``(N,)`` (failed excluded)."""
        rows = self.rows(status=OK)
        y = torch.tensor([self.columns["value"][i] for i in rows], dtype=torch.float32)
        return self.all_samples()[rows], y

    def summary(self) -> dict:
        st = self.columns["status"]
        return {"feedback/rows": len(self), "feedback/ok": st.count(OK), "feedback/failed": st.count(FAILED),
                "feedback/pending": st.count(PENDING)}

    # ------------------------------------------------------------------ Hub
    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None, endpoint: str | None = None):
        """Pushes the rows to the Hub as a dataset repo (``Dataset.push_to_hub``, Parquet); returns the
        ``CommitInfo``. ``sample_shape`` is written into the dataset description. ``endpoint``: a Hub other than
        ``HF_ENDPOINT``. Raises :class:`~hf_control_ft.serialization.saved.HubPushError` (token masked) on any
        failure; the local store is untouched."""
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
        except Exception as err:  # noqa: BLE001 - HTTP and network errors alike
            raise HubPushError(f"feedback push to {repo_id!r} failed (the local feedback in {self.directory!r} is "
                               f"kept): {mask_token(f'{type(err).__name__}: {err}', token)}") from None
        finally:
            datasets.config.HF_ENDPOINT = previous
