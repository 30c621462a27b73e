"""Known harmless warnings of the libraries underneath, silenced where they start (not by a blanket filter).

* transformers, when torchvision is not installed (this project never installs it): importing diffusers'
  pipelines loads ``CLIPImageProcessor`` for the safety checker's feature extractor and transformers warns that
  it falls back to the PIL backend — on every run, for a component training never uses. Only that message is
  dropped, by a filter on transformers' own handler; every other transformers warning passes.

(diffusers' "There are modules ... that should be kept in float32: []" on every dtype cast is avoided at its
source instead: :func:`hf_control_ft.processes.upcast.cast_frozen`.)
"""

from __future__ import annotations

import logging

_DROPPED = ("requires torchvision (not installed); falling back to",)


class _KnownHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _DROPPED)


def silence_known_warnings() -> None:
    """Installs the filter on transformers' handlers (once; nothing when transformers is absent)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    for handler in hf_logging._get_library_root_logger().handlers:
        if not any(isinstance(f, _KnownHarmless) for f in handler.filters):
            handler.addFilter(_KnownHarmless())


__all__ = ["silence_known_warnings"]
