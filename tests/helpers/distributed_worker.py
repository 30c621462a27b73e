"""Run by test_digits.py under ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo).

Trains with examples/train_elegant.py, then reports whether the LoRA weights are identical on all ranks and
every file-system write a non-main rank made inside the output directory (seen through a Python audit hook).
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
import train_elegant  # noqa: E402

from hf_control_ft.core.control import lora_parameters  # noqa: E402

WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.copyfile"}


def main():
    argv = sys.argv[1:]
    out = os.path.abspath(argv[argv.index("--output_dir") + 1])
    writes = []

    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode = args[1] or "r"
            if any(c in str(mode) for c in "wax+") and os.path.abspath(os.fsdecode(args[0])).startswith(out):
                writes.append([event, os.fsdecode(args[0])])
        elif event in WRITE_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
            if os.path.abspath(os.fsdecode(args[0])).startswith(out):
                writes.append([event, os.fsdecode(args[0])])

    if int(os.environ.get("RANK", "0")) != 0:
        sys.addaudithook(audit)
    trainer = train_elegant.run(argv)
    flat = torch.cat([p.detach().flatten() for p in lora_parameters(trainer.model)]).to(trainer.device)
    everyone = trainer.accelerator.gather(flat[None])
    result = {"rank": trainer.accelerator.process_index, "num_processes": trainer.accelerator.num_processes,
              "identical": all(torch.equal(everyone[0], row) for row in everyone),
              "lora_norm": float(flat.norm()), "writes": writes, "sharded": trainer.sharded}
    # one file per rank, outside the output directory (lines printed by two processes can interleave)
    with open(os.path.join(os.environ["RESULT_DIR"], f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
