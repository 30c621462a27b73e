"""Waiting for what a server does on its own threads (accepting, releasing), without fixed sleeps."""

import time


def within(seconds: float, condition) -> bool:
    """Polls ``condition()`` every 50 ms until it holds (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
