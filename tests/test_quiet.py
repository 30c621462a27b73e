"""A run prints no known-harmless library warning (transformers' torchvision fallback, printed on every import of
diffusers' pipelines where torchvision is absent), and other transformers warnings still pass."""

import subprocess
import sys

CODE = """
import hf_control_ft
from diffusers import StableDiffusionPipeline
from transformers.utils import logging
logging.get_logger("transformers.models.clip").warning("a real warning")
"""


def test_the_torchvision_fallback_warning_is_dropped_and_others_pass():
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torchvision" not in done.stderr
    assert "a real warning" in done.stderr
