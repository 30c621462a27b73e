"""SEIKO's oracle side: the oracle wrapper (failures, retries, budgets), the crash-safe feedback dataset, and
people as the oracle (the rating page and ``HumanOracle``)."""

from .human_oracle import HumanOracle
from .oracle import Oracle, OracleAnswer, OracleOutputError, OracleUnavailableError, RoundBudget
from .rating import RatingScale
from .reader import load_feedback
from .store import FeedbackDataset, FeedbackStoreError

__all__ = ["Oracle", "OracleAnswer", "OracleOutputError", "OracleUnavailableError", "RoundBudget", "FeedbackDataset",
           "FeedbackStoreError", "load_feedback", "HumanOracle", "RatingScale"]
