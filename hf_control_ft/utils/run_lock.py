"""One run per output directory: an exclusive OS-level lock on ``<output_dir>/.lock``.

The lock is an ``fcntl.flock`` on an open file, so the operating system releases it when the process dies
(SIGKILL included): a crashed run never leaves a stale lock behind. The file records the holder's pid, which the
error of a second run names. Where ``fcntl`` does not exist (Windows) the lock is a no-op with a warning.
"""

from __future__ import annotations

import logging
import os

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK_NAME = ".lock"
logger = logging.getLogger(__name__)


class RunLockedError(RuntimeError):
    """Another run holds the output directory."""


class RunLock:
    """Context manager holding the exclusive lock of ``directory`` (created if missing).

    Raises :class:`RunLockedError` at once (no waiting) when another process -- or another trainer in this
    process -- holds it.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd = None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            logger.warning("no fcntl on this platform: %s is not protected against a second run", self.directory)
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunLockedError(f"{self.directory} is in use by another run (pid {holder}); wait for it to "
                                     "finish, or use another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
