"""The command-line training scripts' machinery (the top layer): arguments in diffusers' names, validation
images, and the ELEGANT / SEIKO text-to-image runs that ``examples/text_to_image/`` launches."""

from .arguments import ElegantScriptArguments, SeikoScriptArguments, TextToImageArguments, parse_script_args
from .text_to_image import run_elegant, run_seiko
from .validation import Validation

__all__ = ["TextToImageArguments", "ElegantScriptArguments", "SeikoScriptArguments", "parse_script_args",
           "run_elegant", "run_seiko", "Validation"]
