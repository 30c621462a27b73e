"""The feedback store: append-only shards + manifest, recovery from damage, the public reader."""

import json
import logging
import math
import os

import pytest
import torch

from hf_control_ft.feedback.oracle import OracleAnswer
from hf_control_ft.feedback.reader import load_feedback
from hf_control_ft.feedback.store import FeedbackDataset, FeedbackStoreError


def _dead_pid() -> int:
    """The pid of a process that has ended (a killed writer's temporaries carry it)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _store(tmp_path):
    fb = FeedbackDataset(str(tmp_path / "fb"), (1, 2))
    q = fb.add_pending(torch.arange(8.0).reshape(4, 1, 2), round_index=1, prompts=["a", "b", "c", "d"])
    fb.record(q[:2], [OracleAnswer(1.5, "ok", "", 1), OracleAnswer(math.nan, "failed", "boom", 2)], batch_index=0)
    return fb, q


def test_every_change_is_one_shard_and_reloads(tmp_path):
    fb, q = _store(tmp_path)
    assert q == [0, 1, 2, 3] and fb.pending() == [2, 3] and fb.version == 2
    # a crash while writing the next shard leaves a stray temporary file: ignored on load
    open(tmp_path / "fb" / "shards" / f".shard-000099.parquet.tmp-{_dead_pid()}", "wb").write(b"partial")
    re = FeedbackDataset(str(tmp_path / "fb"), (1, 2))
    assert len(re) == 4 and re.pending() == [2, 3]
    assert re.columns["status"][:2] == ["ok", "failed"] and re.columns["error"][1] == "boom"
    assert re.columns["prompt"] == ["a", "b", "c", "d"] and re.columns["attempts"][:2] == [1, 2]
    assert not math.isnan(re.columns["timestamp"][0]) and math.isnan(re.columns["timestamp"][2])
    torch.testing.assert_close(re.samples([3]), torch.tensor([[[6.0, 7.0]]]))
    x, y = re.training_data()
    assert x.shape == (1, 1, 2) and x.dtype == torch.float32 and y.tolist() == [1.5]
    with pytest.raises(ValueError, match="never overwritten"):
        re.record([0], [OracleAnswer(0.0, "ok", "", 1)], batch_index=1)
    # a failed query may be answered later; its attempts add up
    re.record([1, 2, 3], [OracleAnswer(3.0, "ok", "", 1)] * 3, batch_index=1)
    assert re.columns["attempts"][1] == 3 and re.columns["status"][1] == "ok" and re.pending() == []
    with open(tmp_path / "fb" / "manifest.json") as f:
        assert json.load(f)["shards"] == ["shard-000001.parquet", "shard-000002.parquet", "shard-000003.parquet"]
    with pytest.raises(ValueError, match="sample_shape"):
        FeedbackDataset(str(tmp_path / "fb"), (2,))


def test_load_feedback_is_the_public_reader(tmp_path):
    _store(tmp_path)
    ds = load_feedback(str(tmp_path / "fb"))
    assert ds.num_rows == 4
    assert {"query_index", "round", "batch", "status", "value", "error", "attempts", "prompt", "sample"} <= \
        set(ds.column_names)
    assert ds["status"] == ["ok", "failed", "pending", "pending"] and ds["value"][0] == 1.5
    assert ds["sample"][3] == [6.0, 7.0] and ds["prompt"][1] == "b"


def test_missing_or_damaged_manifest_is_rebuilt_from_the_shards(tmp_path, caplog):
    for damage in ("delete", "truncate"):
        fb, _ = _store(tmp_path / damage)
        path = tmp_path / damage / "fb" / "manifest.json"
        if damage == "delete":
            os.remove(path)
        else:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        with caplog.at_level(logging.WARNING, logger="hf_control_ft.feedback.store"):
            re = FeedbackDataset(str(tmp_path / damage / "fb"), (1, 2))
        assert "rebuilding it from the 2 shards" in caplog.text
        assert re.columns["status"] == fb.columns["status"] and re.columns["value"][0] == 1.5
        assert json.loads(path.read_text())["shards"] == ["shard-000001.parquet", "shard-000002.parquet"]


def test_a_damaged_shard_is_named_never_skipped(tmp_path):
    _store(tmp_path)
    shard = tmp_path / "fb" / "shards" / "shard-000002.parquet"  # holds the answers
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeedbackStoreError, match="shard-000002.parquet"):
        FeedbackDataset(str(tmp_path / "fb"), (1, 2))
    os.remove(shard)
    with pytest.raises(FeedbackStoreError, match="shard-000002.parquet.*shard-000001.parquet"):
        FeedbackDataset(str(tmp_path / "fb"), (1, 2))


def test_new_shards_never_overwrite_files_on_disk(tmp_path):
    fb, _ = _store(tmp_path)
    os.remove(tmp_path / "fb" / "manifest.json")
    re = FeedbackDataset(str(tmp_path / "fb"), (1, 2))
    re.record([2], [OracleAnswer(2.0, "ok", "", 1)], batch_index=1)
    assert sorted(os.listdir(tmp_path / "fb" / "shards")) == [f"shard-00000{i}.parquet" for i in (1, 2, 3)]


_KILLED_WRITER = """
import math, os, sys, torch
from hf_control_ft.feedback import store
from hf_control_ft.feedback.oracle import OracleAnswer
fb = store.FeedbackDataset(sys.argv[1], (1, 2))
q = fb.add_pending(torch.arange(8.0).reshape(4, 1, 2), round_index=1, prompts=["a", "b", "c", "d"])
store.FeedbackDataset._write_manifest = lambda self: os._exit(9)  # killed after the shard's rename, before this
fb.record(q[:3], [OracleAnswer(float(i), "ok", "", 1) for i in range(3)], batch_index=0)
"""


def test_a_writer_killed_between_the_shard_and_the_manifest_loses_no_answer(tmp_path, caplog):
    """Fault injection in a child process: the answer shard is renamed into place, then the process dies before
    the manifest lists it. The restart adopts the shard (no answer asked again), the reader does not write."""
    import subprocess
    import sys

    directory = str(tmp_path / "fb")
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, directory], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    assert json.loads((tmp_path / "fb" / "manifest.json").read_text())["shards"] == ["shard-000001.parquet"]
    before = os.path.getmtime(os.path.join(directory, "manifest.json"))
    ds = load_feedback(directory)  # read-only: the manifest is not touched
    assert ds["status"] == ["ok", "ok", "ok", "pending"] and ds["value"][:3] == [0.0, 1.0, 2.0]
    assert os.path.getmtime(os.path.join(directory, "manifest.json")) == before
    with caplog.at_level(logging.WARNING, logger="hf_control_ft.feedback.store"):
        re = FeedbackDataset(directory, (1, 2))
    assert "are adopted" in caplog.text and re.pending() == [3]
    assert json.loads((tmp_path / "fb" / "manifest.json").read_text())["shards"] == [
        "shard-000001.parquet", "shard-000002.parquet"]


def test_the_reader_never_writes_even_when_the_manifest_is_gone(tmp_path):
    fb, _ = _store(tmp_path)
    os.remove(tmp_path / "fb" / "manifest.json")
    open(tmp_path / "fb" / "shards" / f".shard-000009.parquet.tmp-{_dead_pid()}", "wb").write(b"partial")
    listing = sorted(os.listdir(tmp_path / "fb")), sorted(os.listdir(tmp_path / "fb" / "shards"))
    ds = load_feedback(str(tmp_path / "fb"))
    assert ds["status"] == fb.columns["status"] and ds["sample"][3] == [6.0, 7.0]
    assert (sorted(os.listdir(tmp_path / "fb")), sorted(os.listdir(tmp_path / "fb" / "shards"))) == listing
    # the writer (holding the run lock) rebuilds the manifest with the real shape and removes the temporary
    FeedbackDataset(str(tmp_path / "fb"), (1, 2))
    assert json.loads((tmp_path / "fb" / "manifest.json").read_text())["sample_shape"] == [1, 2]
    assert not any(".tmp-" in n for n in os.listdir(tmp_path / "fb" / "shards"))


def test_a_second_writer_never_deletes_a_live_writers_temporary(tmp_path):
    """A writable dataset opened without the run lock (a notebook beside a live trainer) leaves the temporary shard
    of a live process alone; a dead process's temporary is removed."""
    import subprocess
    import sys

    _store(tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        shards = tmp_path / "fb" / "shards"
        mine, dead = shards / f".shard-000003.parquet.tmp-{live.pid}", shards / f".shard-000004.parquet.tmp-{_dead_pid()}"
        mine.write_bytes(b"being written")
        dead.write_bytes(b"partial")
        FeedbackDataset(str(tmp_path / "fb"), (1, 2))
        assert mine.exists() and not dead.exists()
    finally:
        live.kill()
        live.wait()
