"""Crash-safe persistence by versions: immutable version directories plus a one-line ``current`` pointer.

A new version is written to a temporary directory, renamed to its final name, and only then made live by
replacing the pointer file with ``os.replace`` (atomic on one filesystem). A process killed at any moment leaves
either the old or the new version live, never a half-written one. Used by the SEIKO feedback dataset (every
oracle answer) and the SEIKO per-round trainer state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil

logger = logging.getLogger(__name__)


def fsync_dir(path: str) -> None:
    """Flushes a directory entry (the atomic switch) to disk where the OS allows it; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: str | bytes, mode: int = 0o644) -> None:
    """Writes ``data`` to ``path`` whole or not at all: a temporary file ``<path>.tmp-<pid>`` (created with
    ``mode``), flushed to disk, renamed over ``path``, then the directory entry flushed. A killed writer leaves
    the old file and at most a temporary that its owner removes."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_tree(path: str) -> None:
    """Flushes every file below ``path`` to disk, then the directories themselves (best effort for those)."""
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


class VersionedDirectory:
    """Versions live in ``versions_dir/<name>/``; ``pointer_path`` names the live one.

    Write a version with ``tmp = begin(name)`` (fill ``tmp``), then ``commit(name, keep=...)``. One writer at a
    time: the caller holds the run's lock (:class:`~hf_control_ft.utils.run_lock.RunLock`), so opening the
    directory removes the temporaries of killed writers and a commit may delete every older version it does not
    keep, whichever process wrote them (nothing accumulates over restarts).
    """

    def __init__(self, versions_dir: str, pointer_path: str):
        self.versions_dir = versions_dir
        self.pointer_path = pointer_path
        os.makedirs(versions_dir, exist_ok=True)
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        """Temporary version directories and pointer files of killed writers: never live, never read."""
        for name in os.listdir(self.versions_dir):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.versions_dir, name), ignore_errors=True)
        parent = os.path.dirname(os.path.abspath(self.pointer_path))
        prefix = os.path.basename(self.pointer_path) + ".tmp-"
        for name in os.listdir(parent):
            if name.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(parent, name))

    def versions(self) -> list[str]:
        """Names of the complete version directories on disk, oldest first (names sort by age)."""
        return sorted(n for n in os.listdir(self.versions_dir)
                      if not n.startswith(".") and os.path.isdir(os.path.join(self.versions_dir, n)))

    def current(self) -> str | None:
        """Directory of the live version, or ``None`` before the first commit.

        A missing or unreadable pointer, or one that names a missing version, falls back to the newest version
        on disk and logs it: versions exist only after they were complete, so the newest one is intact."""
        name = None
        if os.path.exists(self.pointer_path):
            try:
                with open(self.pointer_path, encoding="utf-8") as f:
                    name = f.read().strip()
            except (OSError, UnicodeDecodeError):
                name = None
            if name and os.path.isdir(os.path.join(self.versions_dir, name)):
                return os.path.join(self.versions_dir, name)
        versions = self.versions()
        if not versions:
            return None
        logger.warning("%s is %s; using the newest version on disk, %s", self.pointer_path,
                       "missing" if name is None and not os.path.exists(self.pointer_path) else
                       f"damaged (it names {name!r})", versions[-1])
        return os.path.join(self.versions_dir, versions[-1])

    def begin(self, name: str) -> str:
        """A fresh temporary directory for version ``name`` (a leftover temporary directory of this name and pid
        is removed: it was never live). An existing version of that name is replaced at commit."""
        tmp = os.path.join(self.versions_dir, f".tmp-{name}-{os.getpid()}")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        return tmp

    def commit(self, name: str, keep: set[str] = frozenset()) -> str:
        """Flushes the temporary directory's files to disk, renames it to ``name``, makes it live, then deletes
        every other version except those in ``keep``. Returns the version's directory."""
        final = os.path.join(self.versions_dir, name)
        tmp = os.path.join(self.versions_dir, f".tmp-{name}-{os.getpid()}")
        fsync_tree(tmp)  # every file on disk before the rename can make the version visible
        if os.path.isdir(final):  # the same round redone after a restart: the new state replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(self.versions_dir)
        write_atomic(self.pointer_path, name + "\n")
        for entry in self.versions():
            if entry != name and entry not in keep:
                shutil.rmtree(os.path.join(self.versions_dir, entry), ignore_errors=True)
        return final
