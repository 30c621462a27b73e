"""SEIKO's oracle side: the oracle wrapper (failures, retries, budgets) and the crash-safe feedback dataset."""

from .oracle import Oracle, OracleAnswer, OracleOutputError, RoundBudget
from .store import FeedbackDataset

__all__ = ["Oracle", "OracleAnswer", "OracleOutputError", "RoundBudget", "FeedbackDataset"]
