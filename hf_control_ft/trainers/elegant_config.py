"""Training configuration: a dataclass validated in ``__post_init__``, loadable from YAML and CLI overrides."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import yaml
from accelerate.utils import LoggerType

from ..utils.validation import field_checker, is_int, is_number

DRIFT_OBJECTIVES = ("pathwise", "adjoint_matching", "value_guided")
# settings a resumed run may not change: they define the objective, the model or the optimiser (train_steps,
# checkpointing, logging and output settings may change)
RESUME_KEYS = ("alpha", "eta", "num_inference_steps", "learn_initial_noise", "conditional_initial_noise",
               "drift_objective", "batch_size",
               "learning_rate", "max_grad_norm", "lr_scheduler", "lr_warmup_steps", "lora_rank", "lora_alpha",
               "lora_target_modules", "truncate_backprop_steps", "value_num_rollouts", "value_train_steps",
               "value_learning_rate", "step_value_train_steps", "noise_num_steps", "noise_train_steps",
               "noise_learning_rate", "noise_batch_size", "aux_hidden", "seed")


def _as_float(text: str):
    """``float(text)``, or ``text`` unchanged when it is not a number (``__post_init__`` then names the field)."""
    try:
        return float(text)
    except ValueError:
        return text


@dataclass
class ElegantConfig:
    """Hyper-parameters of ELEGANT (entropy-regularised control, ``docs/algorithms.md`` §2-4).

    Objective: maximise ``E[r(x_0)] - alpha * KL(P_ft || P_pre)`` where the KL is in nats, summed over every
    dimension of a sample (so ``alpha`` is in reward units per nat).

    ``drift_objective`` picks the stage-3 optimiser (all three have the same optimum, ``docs/algorithms.md`` §2):

    * ``"pathwise"`` (default): the exact gradient of ``r - alpha * KL`` backpropagated through the sampler;
    * ``"adjoint_matching"``: regresses the control ``u_k`` onto ``sigma_k^2 a_{k+1} / alpha`` with the lean
      adjoint ``a`` (:mod:`hf_control_ft.core.adjoint_matching`); same cost per iteration as ``"pathwise"``;
    * ``"value_guided"``: the same regression with ``grad V_{k+1}`` as target, ``V_k`` fitted at every step
      by Feynman--Kac regression on ``value_num_rollouts`` pretrained rollouts for ``step_value_train_steps``
      iterations (:mod:`hf_control_ft.models.step_values`) -- a low-variance target, biased by the value fit; it
      stores ``value_num_rollouts * num_inference_steps`` states, so suits small samples.

    ``rollout_batch_size``: batch of the no-grad pretrained rollouts of stage 1 and of the per-step values
    (default: ``batch_size``); larger than the training batch on big GPUs, since nothing is backpropagated.

    Conditioning: for a conditional process (text-to-image, class-conditional) the stage-1 value, the per-step
    values and the learned initial noise take the process's per-sample condition features
    (``conditional_initial_noise=True``, default), so each prompt / class gets its own start law;
    ``conditional_initial_noise=False`` learns one prompt-agnostic start law (the prompt-averaged tilt).

    Robustness: a drift step whose LoRA gradient is not finite is skipped and counted (``train/skipped_steps``);
    ``max_nonfinite_steps`` such steps in a row stop training with an error. ``train`` refuses an ``output_dir``
    that already holds a run unless it resumes (``resume_from_checkpoint``) or ``overwrite_output_dir=True``
    (which deletes the old checkpoints first); a resumed run refuses settings that change the objective, the
    model or the optimiser (``RESUME_KEYS``). One run at a time holds ``<output_dir>/.lock``.

    On the exact-target benchmark (README) ``"value_guided"`` is the one that reaches the tilted target's mode
    weights; ``truncate_backprop_steps`` applies to ``"pathwise"`` only.
    """

    # objective and sampler
    alpha: float = 1.0
    eta: float = 1.0
    num_inference_steps: int = 50
    learn_initial_noise: bool = True
    conditional_initial_noise: bool = True
    # drift (stage 3)
    drift_objective: str = "pathwise"
    train_steps: int = 500
    batch_size: int = 64
    learning_rate: float = 1e-3
    max_grad_norm: float | None = None
    max_nonfinite_steps: int = 5
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_target_modules: list[str] | None = None
    gradient_checkpointing: bool = True
    truncate_backprop_steps: int | None = None
    # stage 1: value function at the start
    value_num_rollouts: int = 4096
    rollout_batch_size: int | None = None
    value_train_steps: int = 500
    value_learning_rate: float = 1e-3
    step_value_train_steps: int = 2000
    # stage 2: initial noise
    noise_num_steps: int = 20
    noise_train_steps: int = 300
    noise_learning_rate: float = 1e-3
    noise_batch_size: int = 256
    aux_hidden: int = 128
    # bookkeeping
    output_dir: str | None = None
    overwrite_output_dir: bool = False
    checkpointing_steps: int = 0
    checkpoints_total_limit: int | None = 2
    seed: int = 0
    log_every: int = 10
    report_to: str | None = "tensorboard"
    logging_dir: str | None = None
    tracker_project_name: str = "hf_control_ft"

    def __post_init__(self):
        _check = field_checker(type(self).__name__)  # errors name the class the user built (SeikoConfig too)
        _check(is_number(self.alpha) and 0 < self.alpha < math.inf, "alpha",
               f"must be a finite number > 0, got {self.alpha!r}")
        for name in ("learn_initial_noise", "conditional_initial_noise", "gradient_checkpointing",
                     "overwrite_output_dir"):
            v = getattr(self, name)
            _check(isinstance(v, bool), name, f"must be true or false, got {v!r} ({type(v).__name__}); a string "
                   "such as 'false' is not a boolean")
        _check(is_number(self.eta) and 0 < self.eta <= 1, "eta",
               f"must be in (0, 1], got {self.eta!r} (eta = 0 is deterministic: infinite KL for any control)")
        for name in ("num_inference_steps", "train_steps", "batch_size", "lora_rank", "value_num_rollouts",
                     "value_train_steps", "step_value_train_steps", "noise_num_steps", "noise_train_steps",
                     "noise_batch_size",
                     "aux_hidden", "log_every"):
            v = getattr(self, name)
            _check(is_int(v, 1), name, f"must be an int >= 1, got {v!r}")
        for name in ("learning_rate", "value_learning_rate", "noise_learning_rate"):
            v = getattr(self, name)
            _check(is_number(v) and 0 < v < math.inf, name, f"must be a finite number > 0, got {v!r}")
        _check(self.drift_objective in DRIFT_OBJECTIVES, "drift_objective",
               f"must be one of {DRIFT_OBJECTIVES}, got {self.drift_objective!r}")
        _check(self.drift_objective == "pathwise" or self.truncate_backprop_steps is None, "truncate_backprop_steps",
               "applies to drift_objective='pathwise' only (adjoint matching regresses every step and keeps no "
               "graph over the chain); set it to None")
        _check(self.lr_scheduler in ("constant", "constant_with_warmup", "linear", "cosine"), "lr_scheduler",
               f"must be 'constant', 'constant_with_warmup', 'linear' or 'cosine', got {self.lr_scheduler!r}")
        _check(isinstance(self.lr_warmup_steps, int) and self.lr_warmup_steps >= 0, "lr_warmup_steps",
               f"must be an int >= 0, got {self.lr_warmup_steps!r}")
        _check(self.max_grad_norm is None or (is_number(self.max_grad_norm) and 0 < self.max_grad_norm < math.inf),
               "max_grad_norm", f"must be a finite number > 0 or None, got {self.max_grad_norm!r}")
        _check(self.lora_alpha is None or (is_number(self.lora_alpha) and 0 < self.lora_alpha < math.inf),
               "lora_alpha", f"must be a finite number > 0 or None, got {self.lora_alpha!r}")
        _check(self.rollout_batch_size is None or is_int(self.rollout_batch_size, 1), "rollout_batch_size",
               f"must be an int >= 1 or None (None: batch_size), got {self.rollout_batch_size!r}")
        _check(is_int(self.max_nonfinite_steps, 1), "max_nonfinite_steps",
               f"must be an int >= 1, got {self.max_nonfinite_steps!r}")
        _check(self.truncate_backprop_steps is None or (isinstance(self.truncate_backprop_steps, int)
               and 1 <= self.truncate_backprop_steps), "truncate_backprop_steps", "must be an int >= 1 or None")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        _check(self.lora_target_modules is None or (isinstance(self.lora_target_modules, list)
               and len(self.lora_target_modules) > 0
               and all(isinstance(t, str) and t for t in self.lora_target_modules)),
               "lora_target_modules", f"must be None (the default targets) or a non-empty list of module-name "
               f"suffixes, got {self.lora_target_modules!r}")
        _check(isinstance(self.checkpointing_steps, int) and self.checkpointing_steps >= 0, "checkpointing_steps",
               f"must be an int >= 0 (0: no checkpoints), got {self.checkpointing_steps!r}")
        _check(self.checkpointing_steps == 0 or self.output_dir, "output_dir",
               "must be set when checkpointing_steps > 0 (checkpoints go to <output_dir>/checkpoint-<step>)")
        _check(self.checkpoints_total_limit is None or (isinstance(self.checkpoints_total_limit, int)
               and self.checkpoints_total_limit >= 1), "checkpoints_total_limit", "must be an int >= 1 or None")
        _check(is_int(self.seed, 0), "seed", f"must be an int >= 0, got {self.seed!r}")
        trackers = tuple(t.value for t in LoggerType)
        _check(self.report_to in (None, "none") or (isinstance(self.report_to, str) and all(
               t.strip() in trackers for t in self.report_to.split(","))), "report_to",
               f"must be None, 'none' or trackers accelerate supports {trackers} (comma-separated), "
               f"got {self.report_to!r}")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, **overrides):
        """Builds a config; unknown keys are an error that names them."""
        merged = {**(values or {}), **overrides}
        unknown = sorted(set(merged) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {cls.field_names()}")
        float_fields = {f.name for f in dataclasses.fields(cls) if "float" in str(f.type)}
        for key, value in merged.items():
            if key in float_fields and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
                merged[key] = _as_float(value)
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str, **overrides):
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(yaml.safe_load(f) or {}, **overrides)

    @classmethod
    def from_cli(cls, config_path: str | None, overrides: list[str]):
        """YAML file (optional) plus command-line overrides, which win.

        Accepted forms (values parsed as YAML scalars): ``--key value``, ``--key=value``, a bare ``--flag`` for a
        boolean field (true), and several values for a list field (``--lora_target_modules to_q to_k``).
        Dashes in keys may be underscores. Unknown keys are an error naming them.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values, i = {}, 0
        while i < len(overrides):
            token = overrides[i]
            if not token.startswith("--") or len(token) < 3:
                raise ValueError(f"expected '--key value' or '--key=value' after the known arguments, got {token!r}")
            key, eq, inline = token[2:].partition("=")
            key = key.replace("-", "_")
            if key not in fields:
                raise ValueError(f"unknown {cls.__name__} keys {[key]}; valid keys: {sorted(fields)}")
            following = []
            if not eq:
                rest = overrides[i + 1:]
                while len(following) < len(rest) and not rest[len(following)].startswith("--"):
                    following.append(rest[len(following)])
            kind = str(fields[key].type)
            if eq:
                values[key] = yaml.safe_load(inline)
            elif not following:
                if "bool" not in kind:
                    raise ValueError(f"{cls.__name__}.{key}: a value is required (--{key} VALUE or --{key}=VALUE)")
                values[key] = True
            elif len(following) > 1 or ("list" in kind and "int | list" not in kind):
                if "list" not in kind:
                    raise ValueError(f"{cls.__name__}.{key} takes one value, got {following}")
                values[key] = [yaml.safe_load(v) for v in following]
            else:
                values[key] = yaml.safe_load(following[0])
            i += 1 + len(following)
        return cls.from_yaml(config_path, **values) if config_path else cls.from_dict(values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str):
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
