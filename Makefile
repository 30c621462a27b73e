# All set-up happens here, so `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: test demo venv bench clean

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

demo: $(STAMP)
	$(PY) benchmarks/tilted_target.py

bench: $(STAMP)
	$(PY) benchmarks/tilted_target.py
	$(PY) benchmarks/step_cost.py

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
