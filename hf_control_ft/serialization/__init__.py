"""Everything written to disk or the Hub: saved controls (adapter in diffusers' LoRA format, initial noise,
config, model card), training checkpoints, and the Hub push with masked tokens."""

from .lora_io import LORA_WEIGHTS_NAME, attach_lora_file, load_lora_file, save_lora_file
from .saved import HubPushError, push_directory, read_saved, resolve_directory, save_control

__all__ = ["LORA_WEIGHTS_NAME", "save_lora_file", "load_lora_file", "attach_lora_file", "save_control",
           "read_saved", "resolve_directory", "push_directory", "HubPushError"]
