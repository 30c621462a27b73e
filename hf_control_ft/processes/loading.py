"""Loading a base pipeline the way the processes need it, from a Hub id or a local directory.

``DiffusionPipeline.from_pretrained`` reads the pipeline class from ``model_index.json``. A pipeline saved
without an optional component (SD3 without its T5 encoder: ``text_encoder_3: [null, null]``) does not load
unless that component is passed as ``None``; :func:`load_base_pipeline` does that for every component the save
records as absent, and for the ones named in ``absent``.
"""

from __future__ import annotations

import json
import os


def absent_components(name_or_path: str) -> dict:
    """``{component: None}`` for the components a local save records as absent (``[null, null]``)."""
    index = os.path.join(name_or_path, "model_index.json")
    if not os.path.isfile(index):
        return {}
    with open(index, encoding="utf-8") as fh:
        return {k: None for k, v in json.load(fh).items() if v == [None, None]}


def load_base_pipeline(name_or_path: str, absent=(), **kwargs):
    """``DiffusionPipeline.from_pretrained(name_or_path, **kwargs)`` with recorded-absent components and those in
    ``absent`` (e.g. ``("text_encoder_3", "tokenizer_3")``) passed as ``None``; progress bars off."""
    from diffusers import DiffusionPipeline

    missing = {**absent_components(name_or_path), **{name: None for name in absent}}
    pipe = DiffusionPipeline.from_pretrained(name_or_path, **missing, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["load_base_pipeline", "absent_components"]
