"""The feedback oracle: an expensive, possibly noisy, slow or failing black box (``docs/algorithms.md`` §6).

A user oracle is any callable ``fn(samples, prompts) -> values``:

* ``samples``: ``(B, *sample_shape)`` tensor (detached, on CPU); ``prompts``: list of ``B`` strings or ``None``;
* ``values``: a sequence/tensor of ``B`` numbers. An item whose value is ``None``, NaN or infinite is a
  *failed* query (its reason recorded from ``values.errors`` when the oracle gives one string per item, as
  :class:`~hf_control_ft.rewards.http.HTTPReward` does). The whole call may also raise; the wrapper then asks the
  items one by one so that one bad item does not cost the batch -- unless the error says the service itself
  failed (an attribute ``batch_failure=True``): then every item is recorded failed with that reason at once.

It need not be differentiable (SEIKO only learns from its answers). :class:`Oracle` wraps it with the failure
policy: ``"skip"`` records a failed item as failed at once, ``"retry"`` asks it again up to ``max_retries``
times within the call. Failed items are not lost for good: the SEIKO trainer asks them again in later
collections and after a restart, up to ``oracle_max_attempts`` sends in total. ``timeout`` bounds one call. Every item ends as an :class:`OracleAnswer` with ``status`` ``"ok"`` or ``"failed"`` -- failed answers
are recorded in the feedback dataset, never dropped. :class:`RoundBudget` does the per-round accounting: the
budget counts *distinct samples submitted* (retries are counted in ``attempts``, not in the budget).
"""

from __future__ import annotations

import math
import numbers
import threading
from dataclasses import dataclass

import torch

OK = "ok"
FAILED = "failed"
PENDING = "pending"
FAILURE_POLICIES = ("skip", "retry")


class OracleOutputError(ValueError):
    """The oracle broke its contract (not one value per sample): a bug to fix, never a failed query."""


class OracleTimeoutError(TimeoutError):
    """A call exceeded ``oracle_timeout`` (``sent=True``), or was not made because an earlier one still runs."""

    def __init__(self, message: str, sent: bool = True):
        super().__init__(message)
        self.sent = sent


class OracleUnavailableError(RuntimeError):
    """A round got too few answers (an outage): everything obtained is stored; restart when the oracle is back."""


class BudgetExceededError(RuntimeError):
    """Raised when a round would submit more samples than its oracle budget."""


@dataclass
class OracleAnswer:
    """The outcome of one query: ``value`` (NaN unless ``status == "ok"``), ``status``, ``error`` message of the
    last failure (empty when ok) and the number of ``attempts`` the oracle was asked."""

    value: float
    status: str
    error: str
    attempts: int


def _item_value(v, name: str) -> float:
    """One returned value as a float: ``None`` -> NaN (a failed query); a non-number is a contract error."""
    if v is None:
        return math.nan
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
            raise OracleOutputError(f"oracle {name!r} returned {v!r} for one sample; expected one number")
        return float(v.item())
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise OracleOutputError(f"oracle {name!r} returned {v!r} ({type(v).__name__}) for one sample; expected a "
                                "number (or None / NaN for a failed query)")
    return float(v)


def _values_list(values, batch_size: int, name: str) -> list:
    """The per-sample values of one oracle call, checked against the contract (one number per sample)."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise OracleOutputError(f"oracle {name!r} returned a {type(values).__name__}; expected a sequence or a "
                                f"1-D tensor of {batch_size} numbers")
    if isinstance(values, torch.Tensor) or type(values).__module__ == "numpy":
        values = torch.as_tensor(values)
        if values.dim() == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.dim() != 1 or values.dtype == torch.bool:
            raise OracleOutputError(f"oracle {name!r} returned a tensor of shape {tuple(values.shape)} and dtype "
                                    f"{values.dtype}; expected ({batch_size},) numbers")
        values = values.detach().cpu().tolist()
    values = list(values)
    if len(values) != batch_size:
        raise OracleOutputError(f"oracle {name!r} returned {len(values)} values for {batch_size} samples")
    return values


class Oracle:
    """Failure-handling wrapper of a user oracle.

    Args:
        fn: ``fn(samples, prompts) -> B values`` (see the module docstring).
        on_failure: ``"skip"`` (record failed items as failed) or ``"retry"`` (ask them again).
        max_retries: extra attempts per failed item under ``"retry"``.
        name: for messages and the dataset card; defaults to the callable's name.

    Counters: ``num_calls`` (calls of ``fn``), ``num_item_attempts`` (items submitted, retries included).
    """

    def __init__(self, fn, on_failure: str = "skip", max_retries: int = 2, name: str | None = None,
                 timeout: float | None = None):
        if not callable(fn):
            raise TypeError(f"the oracle must be callable, got {type(fn).__name__}")
        if on_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_failure must be one of {FAILURE_POLICIES}, got {on_failure!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
        self.fn = fn
        self.on_failure = on_failure
        self.max_retries = max_retries
        self.timeout = timeout
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.num_calls = 0
        self.num_item_attempts = 0
        self._stray: threading.Thread | None = None  # a timed-out call still running

    def _invoke(self, samples: torch.Tensor, prompts):
        """``fn(samples, prompts)``, in a *daemon* worker thread when ``timeout`` is set: a call past the timeout
        raises :class:`OracleTimeoutError` and its thread, which Python cannot kill, finishes in the background
        without keeping the process alive at exit. While it runs, ``fn`` is not called again (each later call first
        waits up to ``timeout`` for it, then fails at once): a hung oracle never piles up threads that keep calling
        the user's function."""
        if self.timeout is None:
            return self.fn(samples, prompts)
        box = {}

        def run():
            try:
                box["value"] = self.fn(samples, prompts)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                box["error"] = err

        worker = threading.Thread(target=run, name="oracle", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            self._stray = worker
            raise OracleTimeoutError(f"oracle call exceeded oracle_timeout={self.timeout} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _busy(self) -> bool:
        """Whether a timed-out call is still running after waiting up to ``timeout`` for it."""
        if self._stray is not None:
            self._stray.join(self.timeout)
            if self._stray.is_alive():
                return True
            self._stray = None
        return False

    def _call(self, samples: torch.Tensor, prompts) -> list[tuple[float, str]]:
        """One call of ``fn`` on a batch; returns ``(value, error)`` per item (error "" when ok)."""
        B = samples.shape[0]
        if self._busy():
            raise OracleTimeoutError(f"oracle still running an earlier call that exceeded oracle_timeout="
                                     f"{self.timeout} s; not called again until it returns", sent=False)
        self.num_calls += 1
        self.num_item_attempts += B
        raw = self._invoke(samples, prompts)
        errors = getattr(raw, "errors", None)  # per-item reasons of an oracle that says why an item failed
        values = _values_list(raw, B, self.name)
        if not (isinstance(errors, list) and len(errors) == B):
            errors = [""] * B
        out = []
        for v, why in zip(values, errors):
            f = _item_value(v, self.name)
            out.append((f, "") if math.isfinite(f) else (math.nan, str(why) or f"oracle returned {v!r}"))
        return out

    def _ask(self, samples: torch.Tensor, prompts) -> tuple[list[tuple[float, str]], list[int]]:
        """Asks a batch; if the call raises, asks the items one by one (a raising item fails alone).

        Returns the ``(value, error)`` of each item and how many times each item was sent.
        """
        B = samples.shape[0]
        try:
            return self._call(samples, prompts), [1] * B
        except OracleOutputError:
            raise
        except OracleTimeoutError as err:  # the oracle is hung, not one item: asking items alone would hang too
            return [(math.nan, f"TimeoutError: {err}")] * B, [int(err.sent)] * B
        except Exception as err:  # noqa: BLE001 - any user failure becomes a recorded failed query
            if B == 1 or getattr(err, "batch_failure", False):  # the service failed, not an item: no one-by-one
                return [(math.nan, f"{type(err).__name__}: {err}")] * B, [1] * B
        out, sends = [], []
        for i in range(B):
            try:
                res, n = self._ask(samples[i:i + 1], None if prompts is None else [prompts[i]])
            except OracleOutputError as err:  # keep what the items before it obtained (query() records them)
                err.partial = out + [(math.nan, f"OracleOutputError: {err}")] * (B - i)
                err.partial_sends = sends + [2] + [1] * (B - i - 1)
                raise
            out.extend(res)
            sends.append(1 + n[0])  # the failed batch call sent it once already
        return out, sends

    def query(self, samples: torch.Tensor, prompts: list[str] | None = None) -> list[OracleAnswer]:
        """Queries every sample once (plus retries per the policy); returns one answer per sample, in order.

        ``attempts`` counts every time an item was sent to ``fn`` (a batch call that raised and the item's own
        call are two). Raises :class:`OracleOutputError` when ``fn`` breaks its contract (not one number per
        sample: a dict, a string, booleans, a ``(B, 2)`` tensor...): nothing of that call is recorded as ok. When
        the broken call came after others of this query had answered (a retry, the one-by-one fallback), the
        error's ``answers`` attribute holds one answer per sample: those obtained, the rest failed with the
        contract error, for the caller to record before it stops.
        """
        samples = samples.detach().cpu()
        B = samples.shape[0]
        if prompts is not None and len(prompts) != B:
            raise ValueError(f"{len(prompts)} prompts for {B} samples")
        try:
            results, attempts = self._ask(samples, prompts)
        except OracleOutputError as err:
            if getattr(err, "partial", None) is not None:
                err.answers = _answers(err.partial, err.partial_sends)
            raise
        retries = self.max_retries if self.on_failure == "retry" else 0
        for _ in range(retries):
            todo = [i for i, (_, err) in enumerate(results) if err]
            if not todo:
                break
            sub_prompts = None if prompts is None else [prompts[i] for i in todo]
            try:
                sub_results, sub_sends = self._ask(samples[todo], sub_prompts)
            except OracleOutputError as err:  # the answers obtained before the broken call are kept
                sub_results = getattr(err, "partial", None) or [(math.nan, f"OracleOutputError: {err}")] * len(todo)
                sub_sends = getattr(err, "partial_sends", None) or [1] * len(todo)
                for i, res, n in zip(todo, sub_results, sub_sends):
                    results[i] = res
                    attempts[i] += n
                err.answers = _answers(results, attempts)
                raise
            for i, res, n in zip(todo, sub_results, sub_sends):
                results[i] = res
                attempts[i] += n
        return _answers(results, attempts)


def _answers(results, attempts) -> list[OracleAnswer]:
    return [OracleAnswer(value=v, status=FAILED if err else OK, error=err, attempts=a)
            for (v, err), a in zip(results, attempts)]


class RoundBudget:
    """Per-round oracle budgets ``B_1..B_R`` (distinct samples submitted per round).

    Args:
        queries_per_round: an int (same budget every round) or a list with one entry per round.
        num_rounds: number of rounds ``R``.
    """

    def __init__(self, queries_per_round, num_rounds: int):
        if isinstance(queries_per_round, int):
            queries_per_round = [queries_per_round] * num_rounds
        self.budgets = [int(b) for b in queries_per_round]
        if len(self.budgets) != num_rounds:
            raise ValueError(f"{len(self.budgets)} budgets for {num_rounds} rounds")

    def __getitem__(self, round_index: int) -> int:
        """Budget of round ``round_index`` (1-based, as in the papers)."""
        if not 1 <= round_index <= len(self.budgets):
            raise IndexError(f"round {round_index} outside 1..{len(self.budgets)}")
        return self.budgets[round_index - 1]

    @property
    def total(self) -> int:
        return sum(self.budgets)

    def check(self, round_index: int, already_submitted: int, requested: int) -> None:
        """Raises :class:`BudgetExceededError` if ``requested`` more samples would exceed the round's budget."""
        budget = self[round_index]
        if already_submitted + requested > budget:
            raise BudgetExceededError(f"round {round_index}: {already_submitted} samples already submitted, "
                                      f"{requested} requested, budget {budget}")
