"""Reading a run's feedback: :func:`load_feedback`, the supported way for users (and tests) to read it."""

from __future__ import annotations

import glob
import json
import os

import pyarrow.parquet as pq

from .store import MANIFEST, SHARDS, FeedbackDataset, FeedbackStoreError


def load_feedback(output_dir: str):
    """The feedback of a SEIKO run as a ``datasets.Dataset`` (columns ``query_index, round, batch, status, value,
    error, attempts, prompt, sample, timestamp``; ``sample`` flattened float32, its shape in
    ``<output_dir>/feedback/manifest.json``).

    ``output_dir`` is the run's ``config.output_dir`` (or its ``feedback/`` directory itself). Read-only: it never
    writes into the directory (a damaged manifest is rebuilt in memory; a live run may be writing).
    """
    inside = os.path.exists(os.path.join(output_dir, MANIFEST)) or os.path.isdir(os.path.join(output_dir, SHARDS))
    directory = output_dir if inside else os.path.join(output_dir, "feedback")
    return FeedbackDataset(directory, _sample_shape(directory), read_only=True).to_dataset()


def _sample_shape(directory: str) -> tuple:
    """From the manifest, else (damaged manifest) the flat size stored in the first shard with samples."""
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            return tuple(json.load(f)["sample_shape"])
    except (OSError, ValueError, KeyError):
        for path in sorted(glob.glob(os.path.join(directory, SHARDS, "shard-*.parquet"))):
            if "sample" in (schema := pq.read_schema(path)).names:
                return (schema.field("sample").type.list_size,)
        raise FeedbackStoreError(f"no feedback dataset in {directory}") from None
