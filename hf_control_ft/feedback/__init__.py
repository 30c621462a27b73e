"""SEIKO's oracle side: the oracle wrapper (failures, retries, budgets) and the crash-safe feedback dataset."""

from .oracle import Oracle, OracleAnswer, OracleOutputError, OracleUnavailableError, RoundBudget
from .reader import load_feedback
from .store import FeedbackDataset, FeedbackStoreError

__all__ = ["Oracle", "OracleAnswer", "OracleOutputError", "OracleUnavailableError", "RoundBudget", "FeedbackDataset",
           "FeedbackStoreError", "load_feedback"]
