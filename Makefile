# Two commands on a fresh machine:  `make run` (install + the main job) and `make test` (install + tests).
# Each creates/updates the virtual environment in $(VENV) idempotently.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
EXPERIMENT ?= experiments/stride_sweep.py
ARGS ?=
# Offline copies of the named corpora, when a ../shared/data folder sits beside the checkout.
export GPTCORE_DATA_DIR ?= $(abspath $(wildcard ../shared/data))

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: on CPU-only machines this takes the local CPU wheel instead of
	# resolving a newer release with gigabytes of CUDA packages.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m orchestrator run $(EXPERIMENT) $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
