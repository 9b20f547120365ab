# Two commands do all set-up on a fresh machine (Python 3.10+, no GPU needed):
#   make demo   -> virtualenv + pinned CPU torch (only if no torch) + hf_vlm with the tested lock, then the demo
#                  (synthetic CT studies: hf-vlm demo --studies; make demo-2d runs the 2-D one on single slices)
#   make test   -> the same set-up, then the whole test suite (slow tests included)
# Also: make test-latest (newest releases setup.cfg allows), make test-lowest (lowest declared),
#       make lock (re-pin requirements/lock.txt from a fresh venv), make bench.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,medical,metrics
LOCK := requirements/lock.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_vlm-installed

.PHONY: install demo demo-2d test test-fast test-latest test-lowest lint lock bench clean-venv

$(STAMP): setup.cfg pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hf-vlm demo --studies

demo-2d: $(STAMP)
	$(BIN)/hf-vlm demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

test-latest: $(STAMP)
	$(BIN)/python scripts/canary.py latest

test-lowest: $(STAMP)
	$(BIN)/python scripts/canary.py lowest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install -e ".[$(EXTRAS)]"
	{ echo "# The exact versions CI tests (make test / make demo install them with pip -c)."; \
	  echo "# Regenerate with 'make lock' after changing setup.cfg; torch is installed separately (TORCH_SPEC)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|hf.vlm)=='; } > $(LOCK)
	rm -rf .venv-lock

bench: $(STAMP)
	$(BIN)/python -m pip install -c $(LOCK) -e ".[bench]"
	$(BIN)/python benchmarks/bench_scan.py --threads 1 --reps 3

clean-venv:
	rm -rf $(VENV) .venv-latest .venv-lowest
