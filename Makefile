# Two commands do all set-up on a fresh machine (Python 3.10+, no GPU needed):
#   make demo   -> virtualenv + pinned CPU torch (only if no torch) + hf_vlm, then the demo
#   make test   -> the same set-up, then the whole test suite (slow tests included)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,medical,metrics
BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_vlm-installed

.PHONY: install demo test test-fast bench clean-venv

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hf-vlm demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m pip install -e ".[bench]"
	$(BIN)/python benchmarks/bench_scan.py --threads 1 --reps 3

clean-venv:
	rm -rf $(VENV)
