# All set-up happens here, so `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo venv bench clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the constraints file stops every later install from upgrading it
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	@if $(PIP) show torchvision >/dev/null 2>&1; then echo "torchvision must not be installed" >&2; exit 1; fi
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# the inner loop: everything but the subprocess / crash-resume / exact-target tests (about a minute)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

LAUNCH := $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

# the main job: pretrain (cached), then ELEGANT toward digit 3; re-running resumes the finished run instead of
# overwriting it (delete outputs/digits-elegant to start over)
demo: $(STAMP)
	$(PY) examples/pretrain_digits.py
	$(LAUNCH) examples/train_elegant.py --config examples/configs/digits_elegant.yaml --resume_from_checkpoint latest

bench: $(STAMP)
	$(PY) benchmarks/tilted_target.py
	$(PY) benchmarks/step_cost.py
	$(PY) benchmarks/reward_collapse.py
	$(PY) benchmarks/kl_precision.py

clean:
	rm -rf $(VENV) outputs runs .pytest_cache build
