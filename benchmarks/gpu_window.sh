#!/usr/bin/env bash
# The GPU window, one prepared command (a window may be 15 device-minutes): the ELEGANT iteration at real shapes in
# the fast mode and the exact one, each family in its own process under its own time limit, every finished or
# partial line appended to $OUT/sd_step.jsonl at once (benchmarks/sd_step.py). About 8 minutes on one H100 / H200.
#
# Before (here, once): echo /.whl/ >> .git/info/exclude && python3 -m pip download --no-deps -d .whl diffusers==0.42.1
# Then:  run(command="bash benchmarks/gpu_window.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
OUT=${OUT:-gpu_window_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # the device image has torch, transformers, peft, accelerate; not diffusers
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
step() { python3 benchmarks/sd_step.py --batch_sizes 1 --dtype bf16 --repeats 1 --lora_rank 32 --no_flops \
    --output "$OUT/sd_step.jsonl" "$@"; }
# 1. the mode the cost model prices at 2x sampling: bf16 passes, value-guided drift on a quarter of the steps
step --models sd15 flux --time_limit 110 --kl_precision autocast --drift_objective value_guided \
    --train_timestep_fraction 0.25
# 2. the exact KL at half-precision products: difference propagation, value-guided on a quarter of the steps
step --models sd15 flux --time_limit 110 --kl_precision delta --drift_objective value_guided \
    --train_timestep_fraction 0.25
# 3. bf16 passes, the pathwise gradient (7x by the model)
step --models sd15 --time_limit 70 --kl_precision autocast
# 4. the exact fp32-arithmetic KL passes (248x by the model; 49.9 s for SD 1.5's first iteration on an H200)
step --models sd15 --time_limit 90 --kl_precision upcast
echo "done: $OUT/sd_step.jsonl"
