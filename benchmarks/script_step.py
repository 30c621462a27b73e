"""One ``train_elegant.py`` run, as a user launches it, at the real shapes of SD 1.5, SDXL, SD3.5 medium or
FLUX.1-dev with random weights (``benchmarks/model_shapes.py``; no download): the script's own path (the family's
preset, precision and memory switches, the three stages, the final save), its wall time and peak GPU memory, as
one JSON line.

The pipeline loader of the script is replaced by the random-weight pipeline of ``--model`` and the family's preset
is applied as for its checkpoint; everything else is the script. Flags after ``--`` go to the script (they win over
the preset, as on the command line).

    python benchmarks/script_step.py --model flux --train_steps 2              # GPU: FLUX.1-dev shapes, 1024 px
    python benchmarks/script_step.py --model flux --tiny --train_steps 1       # CPU smoke test (tiny pipeline)
    python benchmarks/script_step.py --model sd15 -- --kl_precision tf32 --mixed_precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from model_shapes import build_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = os.path.join(ROOT, "examples", "text_to_image", "prompts.txt")
TINY = ["--resolution", "16", "--num_inference_steps", "3", "--batch_size", "2", "--gradient_accumulation_steps", "1",
        "--value_num_rollouts", "4", "--rollout_batch_size", "4", "--value_train_steps", "2", "--noise_train_steps",
        "2", "--noise_batch_size", "4", "--max_sequence_length", "16"]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    script_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sd15", "sdxl", "sd3", "flux"], default="flux")
    p.add_argument("--tiny", action="store_true", help="tiny random pipeline on CPU (smoke test)")
    p.add_argument("--train_steps", type=int, default=2)
    p.add_argument("--value_num_rollouts", type=int, default=8, help="stage-1 rollouts (kept small: the drift is timed)")
    p.add_argument("--noise_train_steps", type=int, default=10)
    p.add_argument("--output_dir", default=None, help="default: a temporary directory, removed after")
    args = p.parse_args(argv)

    from hf_control_ft.scripts import arguments, run_elegant
    from hf_control_ft.scripts import text_to_image as t2i

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    t2i.load_base_pipeline = lambda *a, **k: build_pipeline(args.model, args.tiny, device)  # the random weights
    arguments.detect_family = lambda *a, **k: args.model  # the preset its checkpoint would get
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output_dir or os.path.join(tmp, "run")
        flags = ["--pretrained_model_name_or_path", f"random-{args.model}", "--prompts_file", PROMPTS,
                 "--reward", "brightness", "--train_steps", str(args.train_steps), "--value_num_rollouts",
                 str(args.value_num_rollouts), "--noise_train_steps", str(args.noise_train_steps),
                 "--validation_steps", "0", "--num_validation_images", "1", "--checkpointing_steps", "0",
                 "--report_to", "none", "--output_dir", out, *(TINY if args.tiny else []), *script_flags]
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        status = run_elegant(flags)
        wall = time.perf_counter() - t0
        metrics_path = os.path.join(out, "metrics.json")
        metrics = json.load(open(metrics_path)) if os.path.isfile(metrics_path) else None
    print(json.dumps({"benchmark": "script_step", "model": f"tiny-random-{args.model}" if args.tiny else
                      f"{args.model}-shaped-random", "device": device,
                      "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "exit_status": status,
                      "train_steps": args.train_steps, "wall_s": round(wall, 2),
                      "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                      if device == "cuda" else None, "script_flags": script_flags, "metrics": metrics}))
    return status


if __name__ == "__main__":
    sys.exit(main())
