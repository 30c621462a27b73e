"""How the command-line entry points report a problem: one line on stderr and an exit status."""

from __future__ import annotations

import sys


def error_line(err: BaseException) -> str:
    """``"Type: first line of the message"`` (``"Type"`` alone for an empty message): a one-line cause."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def exit_with_error(message: str, status: int = 2):
    """Prints ``error: message`` to stderr and exits with ``status``."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


__all__ = ["error_line", "exit_with_error"]
