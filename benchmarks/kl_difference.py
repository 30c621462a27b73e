"""Error of ``kl_precision="delta"`` (difference propagation) per family, against fp64 subtraction on the same stored
weights, as JSON: the per-family error table of the issue "ELEGANT at the field's speed", item 2.

For each family's tiny pipeline (random weights, LoRA ``B`` matrices set to ``scale * N(0, 1)``), 10 steps on the
family's schedule, eta 1, guidance 1 and the family's default, and two control sizes (the tests' and a tenth of it:
a KL 100x smaller), it prints the relative error of the mean path KL and of its LoRA gradient (a vector, norm-wise)
for ``delta`` in bf16 and fp16 autocast, ``autocast`` (two bf16 passes subtracted) and ``delta`` in fp64 arithmetic
(what is left is the rules' own error); ``delta-bf16-fp32-layers`` (a diagnosis: the linear and convolution products
in fp32, attention's in bf16) says which products' rounding the bf16 error comes from. The reference is ``kl_precision="upcast"`` in fp64 arithmetic on the same
stored weights (bf16, or fp16 for the fp16 mode, whose text encoder also runs in fp16).

    python benchmarks/kl_difference.py                          # every family (~5 min on 2 cores)
    python benchmarks/kl_difference.py --families sd sd3 --modes delta-bf16 autocast-bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import os


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "processes"))
from test_kl_difference import (  # noqa: E402
    DEFAULT_GUIDANCE, LORA_SCALE, _error, _exact_arithmetic, _fp64_reference, _kl_and_gradient, _trainer)

MODES = {"delta-bf16": ("delta", "bf16"), "delta-fp16": ("delta", "fp16"), "autocast-bf16": ("autocast", "bf16"),
         "delta-fp64": ("delta", "fp64"), "delta-bf16-fp32-layers": ("delta", "bf16-fp32-layers")}
DEFAULT_MODES = ["delta-bf16", "delta-fp16", "autocast-bf16", "delta-fp64"]


def run(family: str, mode: str, guidance: float, scale: float, references: dict) -> dict:
    precision, dtype = MODES[mode]
    half = "fp16" if dtype == "fp16" else "bf16"  # fp16 runs store fp16 weights and encode prompts in fp16
    if half not in references:
        references[half] = _fp64_reference(family, guidance, scale, mixed_precision=half)
    kl_ref, grad_ref, traj = references[half]
    trainer = _trainer(family, precision, guidance, scale, mixed_precision=half)
    if dtype == "fp64":
        _exact_arithmetic(trainer)
    elif dtype == "bf16-fp32-layers":  # a diagnosis: linear / convolution products in fp32, attention's in bf16
        trainer.process.model.upcast.matmul_dtype = None
    kl, grad, _ = _kl_and_gradient(trainer, traj)
    kl_err, grad_err = _error(kl, grad, kl_ref, grad_ref)
    return {"family": family, "mode": mode, "guidance": guidance, "lora_scale": scale, "kl_fp64": kl_ref,
            "kl_rel_error": kl_err, "grad_rel_error": grad_err}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=sorted(LORA_SCALE))
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    args = parser.parse_args()
    records = []
    for family in args.families:
        for guidance in (1.0, DEFAULT_GUIDANCE[family]):
            for scale in (LORA_SCALE[family], LORA_SCALE[family] / 10):
                references = {}
                for mode in args.modes:
                    if mode != "delta-fp16" or family not in ("qwen-image", "z-image", "wan", "flux2-klein"):
                        records.append(run(family, mode, guidance, scale, references))
                        print(json.dumps(records[-1]), flush=True)
    print(json.dumps({"records": records}))


if __name__ == "__main__":
    main()
