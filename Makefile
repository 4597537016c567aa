# Two commands on a fresh machine:  `make run` (install + the main job) and `make test` (install + tests).
# Each creates/updates the virtual environment in $(VENV) idempotently.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
EXPERIMENT ?= experiments/stride_sweep.py
ARGS ?=
# Offline copies of the named corpora, when a ../shared/data folder sits beside the checkout.
export GPTCORE_DATA_DIR ?= $(abspath $(wildcard ../shared/data))

.PHONY: install browser run test lint bench drop-slow-imports clean
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: on CPU-only machines this takes the local CPU wheel instead of
	# resolving a newer release with gigabytes of CUDA packages.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	$(MAKE) --no-print-directory drop-slow-imports
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m orchestrator run $(EXPERIMENT) $(ARGS)

# The MLflow UI test drives Debian's Chromium headless (Playwright); install it once if absent.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

# Two test processes (pytest-xdist): the Ray scenarios wait on process starts much of the time; one file per process
# at a time, the longest first (tests/conftest.py). ARGS="-n 0" runs them in this process.
test: $(STAMP) browser
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(MAKE) --no-print-directory drop-slow-imports
	$(PY) benchmarks/run_all.py

# Jupyter packages (the bench extra's reference pulls them) bring jsonschema[format-nongpl], whose rfc3987-syntax
# builds a grammar when imported: +1.5 s to every Ray process (`import ray`). Nothing here needs it.
drop-slow-imports:
	@$(PY) -m pip uninstall -y -q rfc3987-syntax 2>/dev/null || true

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
