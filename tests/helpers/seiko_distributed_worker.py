"""The tiny SEIKO run of seiko_child.py under ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo).

    python seiko_distributed_worker.py OUTPUT_DIR ANSWER_LOG RESULT_DIR [KILL]

KILL: ``rank1-drift-2`` (process 1 SIGKILLs itself when round 2's drift starts), ``oracle-call-N`` (the
oracle, on process 0, SIGKILLs its process on its N-th call of this run, before answering) or ``slow-oracle-S``
(a process-group timeout of 4 s, and the oracle's second call takes S seconds: a phase of people rating images). Each process writes
``RESULT_DIR/rankR.json``: counters, whether the adapters are identical on both processes, a hash of them, and
every file-system write a non-main process made inside the output directory (seen through an audit hook).
"""

import hashlib
import json
import os
import signal
import sys
import time
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from seiko_child import LoggingOracle, build_trainer  # noqa: E402

from hf_control_ft.core.control import lora_parameters  # noqa: E402

WRITE_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.copyfile"}


class SlowOracle(LoggingOracle):
    def __init__(self, log_path, seconds):
        super().__init__(log_path)
        self.seconds = seconds

    def __call__(self, samples, prompts):
        if self.calls == 1:
            time.sleep(self.seconds)
        return super().__call__(samples, prompts)


class KillingOracle(LoggingOracle):
    def __init__(self, log_path, kill_at):
        super().__init__(log_path)
        self.kill_at = kill_at

    def __call__(self, samples, prompts):
        if self.calls + 1 == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(samples, prompts)


def main():
    out, log, result_dir = sys.argv[1:4]
    kill = sys.argv[4] if len(sys.argv) > 4 else ""
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    writes = []
    root = os.path.abspath(out)

    def audit(event, args):
        if not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        if not path.startswith(root):
            return
        if (event == "open" and any(c in str(args[1] or "r") for c in "wax+")) or event in WRITE_EVENTS:
            writes.append([event, path])

    if rank != 0:
        sys.addaudithook(audit)
    accelerator = None
    if kill.startswith("oracle-call-"):
        oracle = KillingOracle(log, int(kill.rsplit("-", 1)[1]))
    elif kill.startswith("slow-oracle-"):
        oracle = SlowOracle(log, float(kill.rsplit("-", 1)[1]))
        accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=4))])
    else:
        oracle = LoggingOracle(log)
    trainer = build_trainer(out, oracle, accelerator=accelerator)
    if kill == "rank1-drift-2" and rank == 1:
        train_drift = trainer.train_drift

        def killing_drift(round_index):
            if round_index == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return train_drift(round_index)

        trainer.train_drift = killing_drift
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in lora_parameters(trainer.model)]
                     + [t.flatten() for t in trainer.initial_noise.state_dict().values()])
    everyone = trainer.accelerator.gather(flat[None])
    result = {"rank": trainer.accelerator.process_index, "num_processes": trainer.accelerator.num_processes,
              "identical": all(torch.equal(everyone[0], row) for row in everyone),
              "hash": hashlib.sha256(flat.numpy().tobytes()).hexdigest(), "completed_rounds": trainer.completed_rounds,
              "global_step": trainer.global_step, "num_queries": trainer.num_queries, "oracle_calls": oracle.calls,
              "has_feedback": trainer.feedback is not None, "writes": writes}
    with open(os.path.join(result_dir, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
