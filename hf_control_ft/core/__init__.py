"""The mathematics of the controlled chain (``docs/algorithms.md`` §1-2, §7, §9-11): schedules (DDPM / DDIM
and flow matching) as Gaussian transitions, exact KLs, the LoRA control, the controlled sampler and the
adjoint-matching sweep."""

from .adjoint_matching import adjoint_matching_backward, lean_adjoints
from .control import CONTROL_ADAPTER, add_lora_control, lora_parameters, pretrained_mode
from .flow_matching import FlowMatchSchedule, build_schedule
from .kl import gaussian_kl, gaussian_log_prob
from .sampler import ControlledSampler, Trajectory
from .scheduling import DiffusionSchedule, as_stochastic_scheduler

__all__ = ["DiffusionSchedule", "FlowMatchSchedule", "build_schedule", "as_stochastic_scheduler", "gaussian_kl",
           "gaussian_log_prob", "CONTROL_ADAPTER", "add_lora_control", "lora_parameters", "pretrained_mode",
           "ControlledSampler", "Trajectory", "adjoint_matching_backward", "lean_adjoints"]
