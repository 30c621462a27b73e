"""SEIKO under ``accelerate launch`` with 2 CPU processes (gloo): shares, one oracle writer, kills of either process."""

import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from accelerate import Accelerator

from hf_control_ft.feedback.store import FeedbackDataset
from hf_control_ft.trainers.distributed import run_on_main, shares, tensors_from_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "helpers", "seiko_distributed_worker.py")


def test_shares_split_a_budget_evenly():
    assert shares(12, 2) == [6, 6] and shares(7, 3) == [3, 2, 2] and shares(1, 2) == [1, 0]
    assert all(sum(shares(n, p)) == n for n in range(20) for p in (1, 2, 3, 8))


def test_single_process_helpers_are_plain_calls():
    acc = Accelerator(cpu=True)
    assert run_on_main(acc, lambda a, b: a + b, 2, b=3) == 5
    x, y = tensors_from_main(acc, lambda: (torch.ones(2, 3), torch.arange(4)))
    assert torch.equal(x, torch.ones(2, 3)) and torch.equal(y, torch.arange(4))
    with pytest.raises(KeyError, match="boom"):
        run_on_main(acc, lambda: {}["boom"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out, log, results, kill=""):
    results.mkdir(exist_ok=True)
    for f in results.iterdir():
        f.unlink()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), WORKER, str(out), str(log), str(results), kill]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    ranks = {json.load(open(p))["rank"]: json.load(open(p)) for p in results.iterdir()}
    return done, ranks


def _logged(log):
    with open(log) as f:
        return [tuple(json.loads(line)) for line in f]


@pytest.mark.slow
def test_two_processes_send_every_sample_once_and_survive_a_kill_of_either(tmp_path):
    # the uninterrupted 2-process run: 3 rounds of 12 / 12 / 8 queries, each process draws half of every round
    ref_out, ref_log = tmp_path / "ref", tmp_path / "ref.jsonl"
    done, ref = _launch(ref_out, ref_log, tmp_path / "res")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(ref) == [0, 1] and all(r["num_processes"] == 2 and r["identical"] for r in ref.values())
    assert ref[0]["hash"] == ref[1]["hash"]
    assert all(r["completed_rounds"] == 3 and r["global_step"] == 3 * 2 and r["num_queries"] == 32
               for r in ref.values())
    assert ref[0]["has_feedback"] and not ref[1]["has_feedback"]  # one writer: the main process
    assert ref[1]["oracle_calls"] == 0 and ref[0]["oracle_calls"] == 3 + 3 + 2  # batches of 5
    assert ref[1]["writes"] == []  # process 1 wrote nothing in the run directory
    logged = _logged(ref_log)
    assert len(logged) == 32 and len(set(logged)) == 32
    fb = FeedbackDataset(str(ref_out / "feedback"), (2,))
    assert {tuple(v) for v in fb.samples(list(range(32))).tolist()} == set(logged)

    # 1) process 1 dies as round 2's drift starts: round 2's answers are all on disk already
    out, log = tmp_path / "run", tmp_path / "run.jsonl"
    done, _ = _launch(out, log, tmp_path / "res", kill="rank1-drift-2")
    assert done.returncode != 0
    fb = FeedbackDataset(str(out / "feedback"), (2,))
    assert len(fb) == 24 and fb.pending() == [] and len(_logged(log)) == 24
    answered = {q: (fb.columns["value"][q], fb.columns["status"][q]) for q in range(24)}

    # 2) the restart redoes round 2's update from disk, then the oracle's process dies on round 3's 2nd batch
    done, _ = _launch(out, log, tmp_path / "res", kill="oracle-call-2")
    assert done.returncode != 0
    fb = FeedbackDataset(str(out / "feedback"), (2,))
    assert len(fb) == 32 and len(fb.pending(3)) == 3 and len(_logged(log)) == 24 + 5

    # 3) the last restart asks only the 3 pending samples and ends where the uninterrupted run ended
    done, res = _launch(out, log, tmp_path / "res")
    assert done.returncode == 0, done.stderr[-3000:]
    assert res[0]["oracle_calls"] == 1 and res[1]["oracle_calls"] == 0
    logged = _logged(log)
    assert len(logged) == 32 and len(set(logged)) == 32  # every sample sent exactly once over the three launches
    fb = FeedbackDataset(str(out / "feedback"), (2,))
    for q, kept in answered.items():  # nothing answered before the kills was lost or overwritten
        now = (fb.columns["value"][q], fb.columns["status"][q])
        assert now == kept or (math.isnan(now[0]) and math.isnan(kept[0]) and now[1] == kept[1])
    assert res[0]["hash"] == res[1]["hash"] == ref[0]["hash"]  # identical to the uninterrupted run, bit for bit
    assert res[1]["writes"] == []


@pytest.mark.slow
def test_an_oracle_slower_than_the_process_group_timeout_loses_nothing(tmp_path):
    # process-group timeout 4 s; the oracle's 2nd call takes 12 s (people rating, a rate-limited API): process 1
    # waits in 1-second collectives instead of one broadcast the timeout would kill mid-call
    out, log = tmp_path / "run", tmp_path / "run.jsonl"
    t0 = time.perf_counter()
    done, res = _launch(out, log, tmp_path / "res", kill="slow-oracle-12")
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.perf_counter() - t0 > 12
    assert all(r["completed_rounds"] == 3 and r["num_queries"] == 32 and r["identical"] for r in res.values())
    logged = _logged(log)
    assert len(logged) == 32 and len(set(logged)) == 32  # every sample sent once, none lost
    fb = FeedbackDataset(str(out / "feedback"), (2,))
    assert len(fb) == 32 and fb.pending() == []


@pytest.mark.slow
def test_a_nan_reward_on_one_process_stops_every_process_at_once_naming_it(tmp_path):
    # a rank-local error before a collective: process 1's reward is NaN at its 2nd drift step, process 0 is
    # already in the gradient all-reduce. The job must stop at once (not wait out the process-group timeout) and
    # say why.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), os.path.join(ROOT, "tests", "helpers", "elegant_nan_worker.py"),
           str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and time.perf_counter() - t0 < 120
    assert "returned 4 non-finite values (4 NaN, 0 inf)" in done.stderr
    assert not list(tmp_path.iterdir())  # neither process went on as if nothing happened


def test_an_exception_that_does_not_pickle_reaches_the_other_processes_as_its_text(monkeypatch):
    """The main process raises its own exception; the others get a MainProcessError naming it, instead of
    waiting forever in a broadcast that failed to pickle it."""
    import pickle
    from types import SimpleNamespace

    from hf_control_ft.trainers import distributed

    class Unpicklable(RuntimeError):
        def __reduce__(self):
            raise TypeError("cannot pickle")

    sent = []

    def broadcast(payload, from_process=0):  # what the other processes would receive
        sent.append(pickle.loads(pickle.dumps(payload)))

    monkeypatch.setattr(distributed, "broadcast_object_list", broadcast)

    def fail():
        raise Unpicklable("oracle down\nsecond line")

    main = SimpleNamespace(num_processes=2, is_main_process=True)
    with pytest.raises(Unpicklable, match="oracle down"):
        distributed.run_on_main(main, fail)
    status, value = sent[0][0]
    assert status == "error" and isinstance(value, distributed.MainProcessError)
    assert str(value) == "Unpicklable: oracle down"


def _as_main(monkeypatch):
    import pickle
    from types import SimpleNamespace

    from hf_control_ft.trainers import distributed

    sent = []
    monkeypatch.setattr(distributed, "broadcast_object_list",
                        lambda payload, from_process=0: sent.append(pickle.loads(pickle.dumps(payload))))
    return distributed, SimpleNamespace(num_processes=2, is_main_process=True), sent


def test_an_exception_that_pickles_but_cannot_be_rebuilt_reaches_the_others_as_its_text(monkeypatch):
    """It pickles, so it used to be sent as is -- and the other processes failed to unpickle it with a TypeError
    about a constructor instead of the real cause."""
    distributed, main, sent = _as_main(monkeypatch)

    class NeedsTwo(RuntimeError):
        def __init__(self, what, where):
            super().__init__(f"{what} at {where}")

    def fail():
        raise NeedsTwo("disk full", "/runs/x")

    with pytest.raises(NeedsTwo):
        distributed.run_on_main(main, fail)
    status, value = sent[0][0]
    assert status == "error" and isinstance(value, distributed.MainProcessError)
    assert str(value) == "NeedsTwo: disk full at /runs/x"


@pytest.mark.parametrize("stop", [SystemExit(3), KeyboardInterrupt()])
def test_a_main_process_that_exits_or_is_interrupted_releases_the_others(monkeypatch, stop):
    distributed, main, sent = _as_main(monkeypatch)

    def fail():
        raise stop

    with pytest.raises(type(stop)):
        distributed.run_on_main(main, fail)
    status, value = sent[0][0]  # the others get an error instead of waiting for a broadcast that never comes
    assert status == "error" and isinstance(value, distributed.MainProcessError)
    assert str(value).startswith(f"the main process stopped: {type(stop).__name__}")
