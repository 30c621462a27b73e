"""Recovery helpers of the feedback store (:mod:`hf_control_ft.feedback.store`): temporaries of killed writers,
shards written but not yet listed, and the conversion of the earlier versioned format."""

from __future__ import annotations

import logging
import os
import re

import torch

logger = logging.getLogger("hf_control_ft.feedback.store")

SHARD_PATTERN = re.compile(r"^shard-(\d{6})\.parquet$")
SHARDS = "shards"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_temporaries(directory: str) -> None:
    """Deletes ``*.tmp-PID`` files of killed writers. A temporary whose process is alive is left alone: a writable
    dataset opened without the run lock (a notebook beside a live trainer) must not delete the trainer's shard
    before it is renamed. A temporary is never an answer the manifest could list: shards are renamed before they
    count."""
    for folder in (directory, os.path.join(directory, SHARDS)):
        for name in os.listdir(folder):
            _, sep, pid = name.rpartition(".tmp-")
            if not sep or not os.path.isfile(os.path.join(folder, name)):
                continue
            if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue
            os.remove(os.path.join(folder, name))


def unlisted_shards(directory: str, listed: list[str], on_disk: list[str]) -> list[str]:
    """Complete shards on disk that the manifest does not list and that are to be read. Those numbered after the
    last listed one were renamed into place by a writer killed before it rewrote the manifest: their rows are
    adopted (a warning names them). Unlisted shards numbered *before* it cannot come from that crash (a second
    writer on the directory, before run locks existed); they are named in a warning and left unread."""
    number = lambda name: int(SHARD_PATTERN.match(name).group(1))  # noqa: E731
    last = max((number(n) for n in listed), default=0)
    unlisted = [n for n in on_disk if n not in set(listed)]
    early = [n for n in unlisted if number(n) < last]
    if early:
        logger.warning("feedback shards %s in %s are not in the manifest and older than its last shard; they are "
                       "left unread (inspect them with pyarrow.parquet.read_table)", early, directory)
    late = [n for n in unlisted if number(n) > last]
    if late:
        logger.warning("feedback shards %s in %s were written but not yet listed (the writer stopped before its "
                       "manifest update); their rows are adopted", late, directory)
    return late


def migrate_versioned(store) -> None:
    """Converts ``store`` (a :class:`~hf_control_ft.feedback.store.FeedbackDataset`) from the earlier ``current`` +
    ``versions/`` format into one shard (in memory only when it was opened read-only)."""
    pointer = os.path.join(store.directory, "current")
    if not os.path.exists(pointer):
        return
    from datasets import load_from_disk

    with open(pointer, encoding="utf-8") as f:
        version_dir = os.path.join(store.directory, "versions", f.read().strip())
    ds = load_from_disk(version_dir, keep_in_memory=True)
    cols = {name: list(ds[name]) for name in ds.column_names}
    n = len(cols["query_index"])
    samples = torch.tensor(cols["sample"], dtype=torch.float32).reshape(n, *store.sample_shape)
    store._append_rows(cols["query_index"], cols["round"], cols["prompt"], samples)
    store._update_rows(cols["query_index"], cols["batch"], cols["value"], cols["status"], cols["error"],
                      cols["attempts"], cols["timestamp"])
    if store.read_only:
        return
    store._write_shard(store._table(range(n), with_samples=True))
    logger.warning("converted the feedback dataset in %s to the shard format (%d rows)", store.directory, n)
