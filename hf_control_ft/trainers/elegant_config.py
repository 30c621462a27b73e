"""Training configuration: a dataclass validated in ``__post_init__``, loadable from YAML and CLI overrides."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from accelerate.utils import LoggerType

from ..utils.config_cli import ConfigCliError, parse_flags, read_yaml_mapping
from ..utils.validation import field_checker, is_int, is_number

DRIFT_OBJECTIVES = ("auto", "pathwise", "adjoint_matching", "value_guided")
# settings a resumed run may not change: they define the objective, the model or the optimiser (train_steps,
# checkpointing, logging and output settings may change)
RESUME_KEYS = ("alpha", "eta", "num_inference_steps", "learn_initial_noise", "conditional_initial_noise",
               "drift_objective", "regression_weight_power", "batch_size", "gradient_accumulation_steps",
               "learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "use_ema", "ema_decay",
               "max_grad_norm", "lr_scheduler", "lr_warmup_steps",
               "lora_rank", "lora_alpha",
               "lora_target_modules", "truncate_backprop_steps", "value_num_rollouts", "value_train_steps",
               "value_learning_rate", "step_value_train_steps", "noise_num_steps", "noise_train_steps",
               "noise_learning_rate", "noise_batch_size", "aux_hidden", "seed")

# settings of one run on one machine, not of the model: never published with a save, never adopted by
# ``from_pretrained`` (a consumer's run never reads or writes the publisher's directories or trackers)
RUN_LOCAL_FIELDS = ("output_dir", "overwrite_output_dir", "logging_dir", "report_to", "tracker_project_name",
                    "checkpointing_steps", "checkpoints_total_limit", "log_every", "fsdp")


def _field(default, help_text: str, aliases: tuple = ()):
    """A dataclass field with its ``--help`` text and diffusers' names for it (``aliases``: flags and YAML keys;
    list defaults are copied per instance)."""
    metadata = {"help": help_text, "aliases": tuple(aliases)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


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

    * ``"auto"`` (default): the trainer picks the best one the process supports and logs why
      (:func:`hf_control_ft.trainers.elegant.choose_drift_objective`): ``"value_guided"`` where per-step values
      can be fitted within memory, ``"pathwise"`` otherwise (latent pipelines, large samples,
      ``truncate_backprop_steps``);
    * ``"pathwise"``: the exact gradient of ``r - alpha * KL`` backpropagated through the sampler;
    * ``"adjoint_matching"``: regresses the control ``u_k`` onto ``sigma_k^2 a_{k+1} / alpha`` with the lean
      adjoint ``a`` (:mod:`hf_control_ft.core.adjoint_matching`); same cost per iteration as ``"pathwise"``;
    * ``"value_guided"``: the same regression with ``grad V_{k+1}`` as target, ``V_k`` fitted at every step
      by Feynman--Kac regression on ``value_num_rollouts`` pretrained rollouts for ``step_value_train_steps``
      iterations (:mod:`hf_control_ft.models.step_values`) -- a low-variance target, biased by the value fit; it
      stores ``value_num_rollouts * step_value_states_per_rollout`` states (all steps of every rollout when they
      fit in 2 GiB, else a random subset of steps), so latent pipelines can use it too. Both regressions weight
      step ``k`` by ``(sigma_k^2 / mean sigma^2)^regression_weight_power`` (``docs/algorithms.md`` §7); the
      pathwise gradient scales step ``k``'s LoRA gradient by the same factor.

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

    On the exact-target benchmark (``docs/measurements.md``) ``"value_guided"`` is the one that reaches the tilted
    target's mode weights; ``truncate_backprop_steps`` applies to ``"pathwise"`` only.
    """

    #: flags of diffusers' training scripts this one does not take, and what to use instead
    FLAG_HINTS = {
        "num_train_epochs": "ELEGANT samples its own training data, so it has no epochs: --train_steps (diffusers' "
                            "--max_train_steps) sets the drift iterations",
        "use_8bit_adam": "not supported: the LoRA control's optimiser state is small (AdamW in fp32)",
        "snr_gamma": "not used: the drift is trained on the objective E[r] - alpha KL, not a denoising loss",
    }

    # objective and sampler
    alpha: float = _field(1.0, "KL weight in reward units per nat (KL summed over every dimension of a sample); the "
                               "optimum is p_pre(x) exp(r(x)/alpha) / Z")
    eta: float = _field(1.0, "sampler stochasticity in (0, 1]: DDIM eta (1 = DDPM posterior variance); the KL is "
                             "exact at every eta, and learned initial noise removes the start-noise bias below 1")
    num_inference_steps: int = _field(50, "sampler steps (training and the saved sampler)")
    learn_initial_noise: bool = _field(True, "learn the start law nu(x_T) (stages 1-2); without it the start noise is"
                                             " N(0, I)")
    conditional_initial_noise: bool = _field(True, "conditional processes: one start law per prompt / class "
                                                   "(condition features) instead of one prompt-agnostic law")
    # drift (stage 3)
    drift_objective: str = _field("auto", "stage-3 optimiser: 'auto' (the trainer picks the best the process "
                                          "supports and logs why), 'pathwise' (exact gradient through the sampler), "
                                          "'adjoint_matching' or 'value_guided' (regression on fitted per-step value "
                                          "gradients)")
    train_steps: int = _field(500, "drift (LoRA) iterations; for SEIKO per round", aliases=("max_train_steps",))
    batch_size: int = _field(64, "samples per drift iteration and per process", aliases=("train_batch_size",))
    gradient_accumulation_steps: int = _field(1, "micro-batches of batch_size whose gradients are averaged before "
                                                 "each optimiser step (effective batch = batch_size x this x "
                                                 "processes, memory of one batch_size)")
    learning_rate: float = _field(1e-3, "LoRA learning rate (Adam)")
    adam_beta1: float = _field(0.9, "Adam's first-moment decay of the drift optimiser")
    adam_beta2: float = _field(0.999, "Adam's second-moment decay of the drift optimiser")
    adam_weight_decay: float = _field(0.0, "AdamW weight decay of the LoRA weights (0: the objective alone; a decay "
                                           "pulls the control toward zero, i.e. toward the pretrained model)")
    use_ema: bool = _field(False, "keep an exponential moving average of the LoRA weights; validation images, saves "
                                  "and pushes use it, and it is the final adapter (as diffusers' --use_ema)")
    ema_decay: float = _field(0.999, "--use_ema: decay per drift step, with diffusers' warm-up min(decay, "
                                     "(1 + n) / (10 + n))")
    max_grad_norm: float | None = _field(None, "clip the LoRA gradient norm (None: no clipping)")
    max_nonfinite_steps: int = _field(5, "consecutive drift steps with a non-finite gradient (skipped) before "
                                         "training stops with an error")
    lr_scheduler: str = _field("constant", "'constant', 'constant_with_warmup', 'linear' or 'cosine'")
    lr_warmup_steps: int = _field(0, "warm-up iterations of the learning-rate schedule")
    lora_rank: int = _field(8, "LoRA rank of the control adapter", aliases=("rank",))
    lora_alpha: float | None = _field(None, "LoRA scaling numerator (None: equal to lora_rank)")
    lora_target_modules: list[str] | None = _field(None, "module-name suffixes that get LoRA (None: the family's "
                                                         "attention projections)")
    fsdp: bool = _field(False, "shard the frozen denoiser across processes (FSDP2, each process 1/N of its weights; "
                               "the LoRA stays whole on every process); on by itself under an accelerate FSDP config "
                               "(examples/accelerate/fsdp.yaml)")
    gradient_checkpointing: bool = _field(True, "recompute network activations in the backward pass (memory ~ one "
                                                "step instead of all steps)")
    regression_weight_power: float = _field(
        0.0, "'value_guided' / 'adjoint_matching': step k's regression loss is weighted by (sigma_k^2 / mean "
             "sigma^2)^p; 0: KL units; 1: least squares on the means; 'pathwise': step k's LoRA gradient is scaled "
             "by the same factor (a per-step preconditioner, the chain rule between steps exact); the optimum is "
             "the same for an adapter that fits every step; measured in docs/measurements.md, not better everywhere")
    truncate_backprop_steps: int | None = _field(None, "pathwise only: backpropagate through the last K sampler steps"
                                                       " (None: all)")
    train_timestep_fraction: float = _field(
        1.0, "'value_guided' / 'adjoint_matching': fraction of the random steps whose regression term is trained in "
             "each iteration, drawn at random and weighted by 1 / fraction (an unbiased estimate of the full loss's "
             "gradient at a fraction of its network passes; the iteration's KL is then estimated the same way); "
             "1: every step")
    # stage 1: value function at the start
    value_num_rollouts: int = _field(4096, "pretrained rollouts for the stage-1 value fit (and the per-step values of"
                                           " 'value_guided')")
    rollout_batch_size: int | None = _field(None, "batch of the no-grad rollouts of stage 1 and of the per-step "
                                                  "values (None: batch_size)")
    value_train_steps: int = _field(500, "optimiser steps of the stage-1 value regression")
    value_learning_rate: float = _field(1e-3, "learning rate of the value regressions")
    step_value_train_steps: int = _field(2000, "'value_guided' only: optimiser steps of the per-step value regression")
    step_value_states_per_rollout: int | None = _field(
        None, "'value_guided' only: states of each pretrained rollout kept for the per-step value fit (random steps); "
              "None: all num_inference_steps if value_num_rollouts x steps states fit in 2 GiB, else as many as fit")
    # stage 2: initial noise
    noise_num_steps: int = _field(20, "Euler steps of the initial-noise SDE (stage 2)")
    noise_train_steps: int = _field(300, "optimiser steps of stage 2 (initial noise)")
    noise_learning_rate: float = _field(1e-3, "learning rate of stage 2")
    noise_batch_size: int = _field(256, "batch of stage 2 (cheap: no diffusion-network calls)")
    aux_hidden: int = _field(128, "width of the value and initial-noise networks")
    # bookkeeping
    output_dir: str | None = _field(None, "run directory: checkpoints, logs, the final adapter; a run directory is "
                                          "never overwritten silently")
    overwrite_output_dir: bool = _field(False, "replace an existing run in output_dir (its checkpoints are deleted "
                                               "first)")
    checkpointing_steps: int = _field(0, "save a checkpoint every N drift steps (0: none); resume with "
                                         "resume_from_checkpoint")
    checkpoints_total_limit: int | None = _field(2, "keep the newest N checkpoints (None: all)")
    seed: int = _field(0, "seed of every random stream (adapter init, rollouts, drift noise)")
    log_every: int = _field(10, "log metrics every N iterations")
    report_to: str | None = _field("tensorboard", "trackers accelerate supports, comma-separated (tensorboard, wandb,"
                                                  " comet_ml, mlflow, ...), or 'none'")
    logging_dir: str | None = _field(None, "tracker directory (default <output_dir>/logs in the scripts)")
    tracker_project_name: str = _field("hf_control_ft", "project / run name given to the trackers")

    def __post_init__(self):
        _check = field_checker(type(self).__name__)  # errors name the class the user built (SeikoConfig too)
        _check(is_number(self.alpha) and 0 < self.alpha < math.inf, "alpha",
               f"must be a finite number > 0, got {self.alpha!r}")
        for name in ("learn_initial_noise", "conditional_initial_noise", "gradient_checkpointing",
                     "overwrite_output_dir", "use_ema", "fsdp"):
            v = getattr(self, name)
            _check(isinstance(v, bool), name, f"must be true or false, got {v!r} ({type(v).__name__}); a string "
                   "such as 'false' is not a boolean")
        _check(is_number(self.eta) and 0 < self.eta <= 1, "eta",
               f"must be in (0, 1], got {self.eta!r} (eta = 0 is deterministic: infinite KL for any control)")
        for name in ("num_inference_steps", "train_steps", "batch_size", "gradient_accumulation_steps", "lora_rank",
                     "value_num_rollouts",
                     "value_train_steps", "step_value_train_steps", "noise_num_steps", "noise_train_steps",
                     "noise_batch_size",
                     "aux_hidden", "log_every"):
            v = getattr(self, name)
            _check(is_int(v, 1), name, f"must be an int >= 1, got {v!r}")
        for name in ("learning_rate", "value_learning_rate", "noise_learning_rate"):
            v = getattr(self, name)
            _check(is_number(v) and 0 < v < math.inf, name, f"must be a finite number > 0, got {v!r}")
        _check(is_number(self.regression_weight_power) and -4 <= self.regression_weight_power <= 4,
               "regression_weight_power", f"must be a number in [-4, 4], got {self.regression_weight_power!r}")
        _check(is_number(self.adam_weight_decay) and 0 <= self.adam_weight_decay < math.inf, "adam_weight_decay",
               f"must be a number >= 0, got {self.adam_weight_decay!r}")
        _check(is_number(self.ema_decay) and 0 < self.ema_decay < 1, "ema_decay",
               f"must be a number in (0, 1), got {self.ema_decay!r}")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            _check(is_number(v) and 0 <= v < 1, name, f"must be a number in [0, 1), got {v!r}")
        _check(self.drift_objective in DRIFT_OBJECTIVES, "drift_objective",
               f"must be one of {DRIFT_OBJECTIVES}, got {self.drift_objective!r}")
        _check(self.drift_objective in ("auto", "pathwise") or self.truncate_backprop_steps is None,
               "truncate_backprop_steps",
               "applies to drift_objective='pathwise' only (adjoint matching regresses every step and keeps no "
               "graph over the chain); set it to None")
        _check(is_number(self.train_timestep_fraction) and 0 < self.train_timestep_fraction <= 1,
               "train_timestep_fraction", f"must be a number in (0, 1], got {self.train_timestep_fraction!r}")
        _check(self.drift_objective in ("adjoint_matching", "value_guided") or self.train_timestep_fraction == 1,
               "train_timestep_fraction",
               "applies to drift_objective='value_guided' or 'adjoint_matching' (their loss is a sum of per-step "
               "terms; the pathwise gradient runs through every step); set it to 1 or choose one of them")
        _check(self.lr_scheduler in ("constant", "constant_with_warmup", "linear", "cosine"), "lr_scheduler",
               f"must be 'constant', 'constant_with_warmup', 'linear' or 'cosine', got {self.lr_scheduler!r}")
        _check(isinstance(self.lr_warmup_steps, int) and self.lr_warmup_steps >= 0, "lr_warmup_steps",
               f"must be an int >= 0, got {self.lr_warmup_steps!r}")
        _check(self.max_grad_norm is None or (is_number(self.max_grad_norm) and 0 < self.max_grad_norm < math.inf),
               "max_grad_norm", f"must be a finite number > 0 or None, got {self.max_grad_norm!r}")
        _check(self.lora_alpha is None or (is_number(self.lora_alpha) and 0 < self.lora_alpha < math.inf),
               "lora_alpha", f"must be a finite number > 0 or None, got {self.lora_alpha!r}")
        _check(self.step_value_states_per_rollout is None or is_int(self.step_value_states_per_rollout, 1),
               "step_value_states_per_rollout",
               f"must be an int >= 1 or None (None: as many as fit), got {self.step_value_states_per_rollout!r}")
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
        from ..utils.config_cli import aliases_of

        aliases = aliases_of({f.name: f for f in dataclasses.fields(cls)})
        merged = {aliases.get(k, k): v for k, v in {**(values or {}), **overrides}.items()}
        hinted = sorted(set(merged) & set(getattr(cls, "FLAG_HINTS", {})))
        if hinted:
            raise ValueError(f"{cls.__name__}.{hinted[0]}: {cls.FLAG_HINTS[hinted[0]]}")
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
        return cls.from_dict(read_yaml_mapping(path), **overrides)

    @classmethod
    def from_cli(cls, config_path: str | None, overrides: list[str]):
        """YAML file (optional) plus command-line flags, which win (:mod:`hf_control_ft.utils.config_cli`).

        Accepted forms (values parsed as YAML scalars): ``--key value``, ``--key=value``, a bare ``--flag`` /
        ``--no_flag`` for a boolean field, and several values for a list field (``--lora_target_modules to_q
        to_k``). Dashes in keys may be underscores. Unknown keys are an error naming them.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        try:
            values, extra_config = parse_flags(fields, list(overrides), getattr(cls, "FLAG_HINTS", {}))
        except ConfigCliError as err:
            raise ConfigCliError(f"{cls.__name__}: {err}") from None
        path = extra_config or config_path
        return cls.from_yaml(path, **values) if path else cls.from_dict(values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def published_dict(self) -> dict:
        """The fields that describe the trained model (what a save publishes): all but :data:`RUN_LOCAL_FIELDS`."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_LOCAL_FIELDS}

    def save(self, path: str, published: bool = False) -> None:
        """Writes the config as JSON; ``published``: only what describes the model (:meth:`published_dict`)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.published_dict() if published else self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str):
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
