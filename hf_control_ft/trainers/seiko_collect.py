"""SEIKO's step 1, collecting feedback: sample the round's queries, store them, ask the oracle (mixin of
:class:`~hf_control_ft.trainers.seiko.SeikoTrainer`).

Write-ahead: every sample is in the feedback dataset as *pending* before it is sent, and every oracle batch's
answers are on disk before the next batch is sent (:mod:`hf_control_ft.feedback.store`). A restart finds what is
still pending and asks only that.

Several processes (``accelerate launch``): each draws its share of the round's queries from its own generator
``(seed, round, "sample", rank)``; the main process writes all shares, in process order, and is the only one that
talks to the oracle, so every sample is sent exactly once and there is one writer of the dataset. The others wait
in one-second collectives for as long as the oracle takes (people rating images may take hours: longer than any
process-group timeout), then receive the round's metrics, or the main process's error
(:func:`~hf_control_ft.trainers.distributed.run_on_main_patiently`).
"""

from __future__ import annotations

import math
import time

import torch
from accelerate.utils import gather_object

from ..feedback.oracle import OracleOutputError, OracleUnavailableError
from ..processes.memory import on_device
from .distributed import run_on_main, run_on_main_patiently, shares


class FeedbackCollection:
    """Step 1 of a SEIKO round; expects ``config``, ``process``, ``feedback`` (main process), ``budget``,
    ``oracle``, ``accelerator``, ``sample`` and ``_rank_generator`` from the trainer."""

    def _draw_queries(self, round_index: int, num_samples: int, generator: torch.Generator):
        """``(samples, conditions)`` of a round's queries: one condition per query (a prompt drawn uniformly from
        the source; ``None`` for unconditional processes), then its sample under that condition. Round 1
        samples the pretrained model ``p_0``, later rounds the current fine-tuned model ``p_{i-1}``."""
        conditions = self.process.draw_conditions(num_samples, generator)
        x = self.sample(num_samples, generator, batch_size=self.config.batch_size, controlled=round_index > 1,
                        prompts=conditions)
        return x, conditions

    def _oracle_inputs(self, query_indices: list[int]):
        """What the oracle is asked for these stored queries: ``(inputs, prompts)`` (decoded for latents)."""
        samples = self.feedback.samples(query_indices)
        conditions = self.feedback.prompts(query_indices) if self.prompts is not None else None
        return self.process.oracle_inputs(samples, conditions, chunk_size=self.config.batch_size)

    def collect_feedback(self, round_index: int) -> dict:
        """Samples the round's budget from the current model (write-ahead), queries every pending sample, asks
        failed queries of this and earlier rounds again (up to ``oracle_max_attempts`` sends each), and stops
        with :class:`OracleUnavailableError` when fewer than ``min_answer_fraction`` of the round's queries are
        answered (everything obtained is stored; a restart after the outage asks again).

        With several processes each draws its share of the budget; the main process stores all of them and is
        the only one that talks to the oracle (the others wait, then receive the round's metrics or its error).
        """
        budget = self.budget[round_index]
        submitted = run_on_main(self.accelerator, lambda: self.feedback.num_submitted(round_index))
        if submitted == 0:
            self.budget.check(round_index, 0, budget)
            self._submit_queries(round_index, budget)
        elif submitted != budget:
            raise RuntimeError(f"round {round_index} has {submitted} samples on disk but a budget of {budget}")
        metrics = run_on_main_patiently(self.accelerator, self._ask_oracle, round_index)
        self._num_queries = metrics["round/total_queries"]
        return metrics

    def _submit_queries(self, round_index: int, budget: int) -> None:
        """Every process draws its share of the round's queries; the main process writes all of them, in process
        order, to the feedback dataset as pending (before anything is sent)."""
        num_processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        share = shares(budget, num_processes)[rank]
        if share:
            x, prompts = self._draw_queries(round_index, share, self._rank_generator(round_index, "sample"))
            x = x.cpu()
        else:  # a budget smaller than the number of processes
            x, prompts = torch.zeros((0, *self.sample_shape)), ([] if self.prompts is not None else None)
        parts = gather_object([(x, prompts)]) if num_processes > 1 else [(x, prompts)]

        def write():
            samples = torch.cat([part[0] for part in parts])
            conditions = None if parts[0][1] is None else [p for part in parts for p in part[1]]
            self.feedback.add_pending(samples, round_index, conditions)

        run_on_main(self.accelerator, write)

    def _ask_oracle(self, round_index: int) -> dict:
        """Main process: sends the pending and retryable queries in batches, storing each batch's answers
        before the next is sent; returns the round's metrics."""
        cfg = self.config
        todo = self.feedback.pending(round_index) + self.feedback.retryable(cfg.oracle_max_attempts, round_index)
        batches = [todo[i:i + cfg.oracle_batch_size] for i in range(0, len(todo), cfg.oracle_batch_size)]
        t0 = time.perf_counter()
        # --offload: an oracle that is a model (a VLM judge, a preference model) holds the accelerator only while
        # it answers; between rounds the drift has the memory (it runs every step: no other network moves)
        module = self.oracle.fn if isinstance(self.oracle.fn, torch.nn.Module) else None
        offload = module is not None and getattr(getattr(self.process, "options", None), "offload", False)
        with on_device([module] if offload else [], self.device, enabled=offload):
            if getattr(self.oracle.fn, "streams_answers", False):
                self._ask_streaming(round_index, batches)
            else:
                self._ask_batches(round_index, batches)
        rows = self.feedback.rows(round_index)
        ok = [i for i in rows if self.feedback.columns["status"][i] == "ok"]
        if len(ok) < cfg.min_answer_fraction * len(rows):
            failed = [i for i in rows if self.feedback.columns["status"][i] != "ok"]
            exhausted = sum(self.feedback.columns["attempts"][i] >= cfg.oracle_max_attempts for i in failed)
            raise OracleUnavailableError(
                f"round {round_index}: only {len(ok)} of {len(rows)} queries answered (min_answer_fraction="
                f"{cfg.min_answer_fraction}); last oracle error: {self.feedback.columns['error'][failed[-1]]!r}. "
                f"Every answer obtained is saved in {self.feedback.directory}; restart with the same output_dir "
                f"when the oracle is back ({exhausted} queries used all oracle_max_attempts={cfg.oracle_max_attempts}"
                " sends: raise it to ask them again)")
        values = [self.feedback.columns["value"][i] for i in ok]
        return {"round/queries": len(rows), "round/failed_queries": len(rows) - len(ok),
                "round/oracle_mean": sum(values) / len(values) if values else math.nan,
                "round/oracle_max": max(values) if values else math.nan,
                "round/total_queries": len(self.feedback), "time/oracle_s": time.perf_counter() - t0}

    def _ask_batches(self, round_index: int, batches: list[list[int]]) -> None:
        """A plain oracle: one call per batch, its answers stored before the next batch is sent."""
        for batch in self._progress(batches, f"round {round_index}: oracle", leave=False):
            try:
                answers = self.oracle.query(*self._oracle_inputs(batch))
            except OracleOutputError as err:  # a contract bug: keep the answers this query obtained, then stop
                if getattr(err, "answers", None) is not None:
                    self.feedback.record(batch, err.answers, self.feedback.next_batch_index(round_index))
                raise
            self.feedback.record(batch, answers, self.feedback.next_batch_index(round_index))

    def _ask_streaming(self, round_index: int, batches: list[list[int]]) -> None:
        """An oracle that answers query by query (people on the rating page,
        :class:`~hf_control_ft.feedback.human_oracle.HumanOracle`): every query is queued (decoded batch by batch),
        then each answer is stored the moment it arrives."""
        todo, keys = [q for batch in batches for q in batch], []
        for batch in batches:
            keys += self.oracle.fn.enqueue(*self._oracle_inputs(batch), round_index=round_index, query_indices=batch)
        self.oracle.num_calls += 1
        for i, answer in self._progress(self.oracle.fn.answers(keys), f"round {round_index}: ratings",
                                        total=len(keys), leave=False):
            self.feedback.record([todo[i]], [answer], self.feedback.next_batch_index(round_index))
        refit = getattr(self.oracle.fn, "current_values", None)
        if refit is not None:  # pairwise: the earlier rounds' values, refitted with this round's comparisons
            values = refit()
            earlier = {q: v for q, v in values.items() if q < len(self.feedback)
                       and self.feedback.columns["round"][q] < round_index}
            self.feedback.revalue(earlier)
