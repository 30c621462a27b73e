"""Configuration of SEIKO (online feedback-efficient fine-tuning, ``docs/algorithms.md`` §6).

:class:`SeikoConfig` extends :class:`~hf_control_ft.trainers.elegant_config.ElegantConfig`: every ELEGANT field
keeps its meaning for the per-round update (``train_steps`` = drift iterations *per round*, ``value_*`` / ``noise_*`` = the
per-round initial-noise stages, ``alpha`` = KL weight to the pretrained model), and the SEIKO fields below are
added. Both KL weights are in reward units per nat, the KL summed over every dimension of a sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..feedback.oracle import FAILURE_POLICIES
from ..models.reward_ensemble import OPTIMISM_KINDS
from ..utils.validation import field_checker, is_int, is_number
from .elegant_config import ElegantConfig, _field

_check = field_checker("SeikoConfig")


@dataclass
class SeikoConfig(ElegantConfig):
    """Hyper-parameters of SEIKO.

    Round ``i`` maximises ``E[r_hat + g] - alpha KL(p || p_pre) - beta KL(p || p_{i-1})``, whose optimum is
    ``p_i ∝ exp((r_hat + g) / (alpha + beta)) p_pre^(alpha / (alpha + beta)) p_{i-1}^(beta / (alpha + beta))``.

    SEIKO fields:
        num_rounds: rounds ``R``.
        queries_per_round: oracle budget per round: one int for every round, or a list of ``R`` ints.
        beta: KL weight to the previous round's model (> 0).
        optimism: ``"ucb"``, ``"bootstrap"``, ``"ts"`` or ``"greedy"``
            (see :mod:`hf_control_ft.models.reward_ensemble`).
            The non-adaptive baseline is ``num_rounds=1`` (whole budget from the pretrained model).
        ensemble_size: reward heads (``"bootstrap"`` needs >= 2).
        ucb_ridge: ``lambda`` of the Gram matrix ``lambda I + sum phi phi^T``.
        bonus_scale, bonus_cap: the UCB bonus is ``C * (alpha + beta) * width`` (``width`` the dimensionless
            Gram-matrix width, about ``1 / sqrt(n)`` among ``n`` queries, order 1 and more where there are none),
            i.e. ``C * width`` *nats* of tilt of the round's update; the UCB / bootstrap bonus saturates smoothly at
            ``bonus_cap`` nats, ``bonus_cap * (alpha + beta)`` reward units (``g = m tanh(g_raw / m)``), so one
            round multiplies no density by more than ``exp(bonus_cap)`` for the bonus's sake. ``None`` leaves it
            unbounded: off the data the raw bonus grows without bound and the drift would chase it off the
            feasible manifold. Neither depends on the oracle's noise (``docs/algorithms.md`` section 6).
        feature_std_floor: the reward model's feature standard deviations are floored at this fraction of their
            mean over features (nearly constant features, such as image borders, would otherwise be amplified).
        reward_hidden, reward_depth, reward_train_steps, reward_learning_rate, reward_weight_decay,
            reward_batch_size: the reward heads and their per-round fit.
        oracle_batch_size: samples per oracle call; the dataset is persisted after each.
        oracle_on_failure: ``"skip"`` or ``"retry"``; oracle_max_retries: extra attempts under ``"retry"``
            within one call.
        oracle_max_attempts: total sends of one query over the whole run (restarts included): failed queries are
            asked again in later collections and after a restart until they reach it.
        oracle_timeout: seconds one oracle call may take; a slower call fails its items and the oracle is not called
            again while it still runs (it finishes in a daemon thread; ``None``: no limit).
        min_answer_fraction: a round stops with ``OracleUnavailableError`` when fewer of its queries have an
            answer (the answers obtained are kept; a restart asks the rest again).
        output_dir: where the feedback dataset and the per-round trainer state live (resume from it).
    """

    num_rounds: int = _field(4, "feedback rounds R (sample -> query -> fit reward -> update)")
    queries_per_round: int | list[int] = _field(256, "oracle budget per round: one int, or a list of R ints")
    beta: float = _field(1.0, "KL weight to the previous round's model (> 0), reward units per nat")
    optimism: str = _field("ucb", "'ucb', 'bootstrap', 'ts' or 'greedy' (non-adaptive baseline: num_rounds=1)")
    bonus_scale: float = _field(1.0, "C of the UCB / bootstrap bonus (>= 0); UCB: nats of tilt per unit of width")
    ensemble_size: int = _field(4, "reward heads ('bootstrap' and 'ts' need >= 2)")
    ucb_ridge: float = _field(1.0, "lambda of the UCB Gram matrix lambda I + sum phi phi^T")
    bonus_cap: float | None = _field(3.0, "the bonus saturates at this many nats of tilt, bonus_cap * (alpha + beta) "
                                          "reward units (None: unbounded)")
    feature_std_floor: float = _field(0.1, "reward-model feature std floor, as a fraction of the mean std")
    reward_hidden: int = _field(64, "width of the reward heads")
    reward_depth: int = _field(2, "hidden layers of the reward heads")
    reward_train_steps: int = _field(500, "optimiser steps of the per-round reward fit")
    reward_learning_rate: float = _field(3e-3, "learning rate of the reward fit")
    reward_weight_decay: float = _field(1e-4, "weight decay of the reward fit")
    reward_batch_size: int = _field(256, "batch of the reward fit")
    oracle_batch_size: int = _field(64, "samples per oracle call; answers are persisted after each call")
    oracle_on_failure: str = _field("skip", "'skip' or 'retry' a failed oracle call")
    oracle_max_retries: int = _field(2, "extra attempts within one call under 'retry'")
    oracle_max_attempts: int = _field(5, "total sends of one query over the whole run, restarts included")
    oracle_timeout: float | None = _field(None, "seconds one oracle call may take (None: no limit)")
    min_answer_fraction: float = _field(0.5, "a round stops with OracleUnavailableError when fewer of its queries "
                                             "are answered (answers kept; a restart asks the rest)")
    output_dir: str = _field("seiko_output", "run directory: feedback dataset, round state, checkpoints")
    tracker_project_name: str = _field("hf_control_ft_seiko", "project / run name given to the trackers")

    def __post_init__(self):
        super().__post_init__()
        _check(self.drift_objective in ("auto", "pathwise"), "drift_objective",
               f"SEIKO rounds use the pathwise two-KL gradient; got {self.drift_objective!r}")
        self.drift_objective = "pathwise"  # what "auto" means for SEIKO
        _check(not self.use_ema, "use_ema", "is not supported by SEIKO: each round's update starts from the previous "
               "round's adapter and is measured against it (its KL to the previous round)")
        _check(not self.fsdp, "fsdp", "is not supported by SEIKO yet: its rounds sample unequal shares of queries per "
               "process, and a sharded network needs every process to call it alike")
        _check(is_int(self.num_rounds, 1), "num_rounds", f"must be an int >= 1, got {self.num_rounds!r}")
        q = self.queries_per_round
        if isinstance(q, (list, tuple)):
            _check(len(q) == self.num_rounds, "queries_per_round",
                   f"has {len(q)} entries but num_rounds is {self.num_rounds}")
            _check(all(is_int(v, 1) for v in q), "queries_per_round", f"entries must be ints >= 1, got {list(q)!r}")
            self.queries_per_round = [int(v) for v in q]
        else:
            _check(is_int(q, 1), "queries_per_round", f"must be an int >= 1 or a list of them, got {q!r}")
        _check(isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool) and self.beta > 0, "beta",
               f"must be > 0, got {self.beta!r}")
        _check(self.optimism in OPTIMISM_KINDS, "optimism", f"must be one of {OPTIMISM_KINDS}, got {self.optimism!r}")
        _check(isinstance(self.bonus_scale, (int, float)) and self.bonus_scale >= 0, "bonus_scale",
               f"must be >= 0, got {self.bonus_scale!r}")
        _check(is_int(self.ensemble_size, 1), "ensemble_size", f"must be an int >= 1, got {self.ensemble_size!r}")
        _check(self.optimism not in ("bootstrap", "ts") or self.ensemble_size >= 2, "ensemble_size",
               f"must be >= 2 for optimism={self.optimism!r} (got {self.ensemble_size})")
        _check(isinstance(self.ucb_ridge, (int, float)) and self.ucb_ridge > 0, "ucb_ridge",
               f"must be > 0, got {self.ucb_ridge!r}")
        _check(self.bonus_cap is None or (is_number(self.bonus_cap) and 0 < self.bonus_cap < math.inf), "bonus_cap",
               f"must be a finite number > 0 or None, got {self.bonus_cap!r}")
        _check(isinstance(self.feature_std_floor, (int, float)) and not isinstance(self.feature_std_floor, bool)
               and 0 <= self.feature_std_floor < 1, "feature_std_floor",
               f"must be in [0, 1), got {self.feature_std_floor!r}")
        for name in ("reward_hidden", "reward_depth", "reward_train_steps", "reward_batch_size", "oracle_batch_size"):
            _check(is_int(getattr(self, name), 1), name, f"must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("reward_learning_rate",):
            _check(isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0, name, "must be > 0")
        _check(isinstance(self.reward_weight_decay, (int, float)) and self.reward_weight_decay >= 0,
               "reward_weight_decay", f"must be >= 0, got {self.reward_weight_decay!r}")
        _check(self.oracle_on_failure in FAILURE_POLICIES, "oracle_on_failure",
               f"must be one of {FAILURE_POLICIES}, got {self.oracle_on_failure!r}")
        _check(is_int(self.oracle_max_attempts, 1), "oracle_max_attempts",
               f"must be an int >= 1, got {self.oracle_max_attempts!r}")
        _check(self.oracle_timeout is None or (is_number(self.oracle_timeout) and 0 < self.oracle_timeout < math.inf),
               "oracle_timeout", f"must be a number of seconds > 0 or None, got {self.oracle_timeout!r}")
        _check(is_number(self.min_answer_fraction) and 0 <= self.min_answer_fraction <= 1, "min_answer_fraction",
               f"must be in [0, 1], got {self.min_answer_fraction!r}")
        _check(is_int(self.oracle_max_retries, 0), "oracle_max_retries",
               f"must be an int >= 0, got {self.oracle_max_retries!r}")
        _check(isinstance(self.output_dir, str) and bool(self.output_dir), "output_dir", "must be a non-empty path")

    def budgets(self) -> list[int]:
        """Oracle budget of each round, ``[B_1, ..., B_R]``."""
        q = self.queries_per_round
        return list(q) if isinstance(q, list) else [q] * self.num_rounds

    def card_fields(self, oracle: str, total_queries: int) -> dict:
        """The SEIKO settings a model card names (rounds, budget, optimism, beta, oracle, feedback dataset)."""
        return {"beta": self.beta, "num_rounds": self.num_rounds, "queries_per_round": self.queries_per_round,
                "optimism": self.optimism, "oracle": oracle, "total_queries": total_queries,
                "feedback": "`feedback/` in the run directory (parquet shards + manifest)"}

    def elegant_config(self) -> ElegantConfig:
        """The ELEGANT fields as an :class:`ElegantConfig` (what the shared machinery and saved adapters use)."""
        names = ElegantConfig.field_names()
        return ElegantConfig.from_dict({k: v for k, v in self.to_dict().items() if k in names})
