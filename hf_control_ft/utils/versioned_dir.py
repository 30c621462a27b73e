"""Crash-safe persistence by versions: immutable version directories plus a one-line ``current`` pointer.

A new version is written to a temporary directory, renamed to its final name, and only then made live by
replacing the pointer file with ``os.replace`` (atomic on one filesystem). A process killed at any moment leaves
either the old or the new version live, never a half-written one. Used by the SEIKO feedback dataset (every
oracle answer) and the SEIKO per-round trainer state.
"""

from __future__ import annotations

import contextlib
import os
import shutil


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


class VersionedDirectory:
    """Versions live in ``versions_dir/<name>/``; ``pointer_path`` names the live one.

    Write a version with ``tmp = begin(name)`` (fill ``tmp``), then ``commit(name, keep=...)``.
    """

    def __init__(self, versions_dir: str, pointer_path: str):
        self.versions_dir = versions_dir
        self.pointer_path = pointer_path
        os.makedirs(versions_dir, exist_ok=True)

    def current(self) -> str | None:
        """Directory of the live version, or ``None`` before the first commit."""
        if not os.path.exists(self.pointer_path):
            return None
        with open(self.pointer_path, encoding="utf-8") as f:
            return os.path.join(self.versions_dir, f.read().strip())

    def begin(self, name: str) -> str:
        """A fresh temporary directory for version ``name`` (leftovers of a crash before a switch are removed:
        they were never live)."""
        tmp = os.path.join(self.versions_dir, f".tmp-{name}-{os.getpid()}")
        for stale in (tmp, os.path.join(self.versions_dir, name)):
            if os.path.exists(stale):
                shutil.rmtree(stale)
        os.makedirs(tmp)
        return tmp

    def commit(self, name: str, keep: set[str] = frozenset()) -> str:
        """Renames the temporary directory to ``name``, makes it live, then deletes every other version directory
        except those in ``keep``. Returns the version's directory."""
        final = os.path.join(self.versions_dir, name)
        os.rename(os.path.join(self.versions_dir, f".tmp-{name}-{os.getpid()}"), final)
        fsync_dir(self.versions_dir)
        pointer_tmp = f"{self.pointer_path}.tmp-{os.getpid()}"
        with open(pointer_tmp, "w", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, self.pointer_path)
        fsync_dir(os.path.dirname(os.path.abspath(self.pointer_path)))
        for entry in os.listdir(self.versions_dir):
            path = os.path.join(self.versions_dir, entry)
            if entry not in keep | {name} and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
        return final
