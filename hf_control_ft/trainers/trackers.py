"""Trackers by name: ``report_to`` as ``Accelerator(log_with=...)`` takes it, checked before a run starts."""

from __future__ import annotations


def tracker_names(report_to: str | None) -> list[str] | None:
    """The trackers of ``report_to`` (comma-separated) as ``Accelerator(log_with=...)`` takes them (None: none)."""
    return None if report_to in (None, "none") else [t.strip() for t in report_to.split(",")]


def check_trackers(report_to: str | None) -> None:
    """Raises ``ValueError`` when a tracker named in ``report_to`` is not installed (``accelerate`` would drop it
    with a warning and the run would log nowhere)."""
    from accelerate.tracking import _available_trackers

    available = {str(getattr(t, "value", t)) for t in _available_trackers}
    missing = [t for t in tracker_names(report_to) or [] if t not in available]
    if missing:
        raise ValueError(f"--report_to {','.join(missing)}: not installed here (pip install {' '.join(missing)}); "
                         f"available trackers: {sorted(available)}, or 'none'")


__all__ = ["tracker_names", "check_trackers"]
