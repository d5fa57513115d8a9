# Two commands for a newcomer: `make serve` and `make test`. Both build .venv on first use.
# `make bench` (docs/performance.md) and `make oracle` (bench/oracle) build their own
# .venv-bench with the `bench` extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint typecheck unit clean bench oracle fuzz load wrk

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	mkdir -p $(VENV)/mypy-path && ln -sfn ../.. $(VENV)/mypy-path/gradiag
	touch $@

serve: $(BIN)/.installed
	$(BIN)/gradiag serve --host $(HOST) --port $(PORT)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy finds `gradiag` through a link to this folder (an editable install is an import
# hook, which mypy does not follow)
typecheck: $(BIN)/.installed
	MYPYPATH=$(VENV)/mypy-path $(BIN)/mypy

unit: $(BIN)/.installed
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck unit

BENCH_VENV := .venv-bench
$(BENCH_VENV)/bin/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -e '.[bench]'
	touch $@

# The throughput rows use wrk (Debian's `wrk` package): installed here when missing and apt-get
# is usable as root; otherwise bench/run.py falls back to Python client threads and says so.
wrk:
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { apt-get install -y -qq wrk || { apt-get update -qq && apt-get install -y -qq wrk; }; } \
	  || echo "note: wrk is not installed; the throughput rows use Python client threads"; }

# OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE are unset for this command only (bench/README.md).
bench: $(BENCH_VENV)/bin/.installed wrk
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BENCH_VENV)/bin/python -m bench.run $(BENCH_ARGS)

# PyTorch's answers as committed fixtures (bench/oracle/__main__.py); the tests read them
# and never import torch.
oracle: $(BENCH_VENV)/bin/.installed
	$(BENCH_VENV)/bin/python -m bench.oracle $(ORACLE_ARGS)

# A longer, unseeded schemathesis run (docs/hardening.md); `make test` runs 40 per operation.
FUZZ_EXAMPLES ?= 2000
fuzz: $(BIN)/.installed
	GRADIAG_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q tests/test_fuzz.py

# Load and fault tests against gunicorn on 127.0.0.1 (bench/load.py); not part of `make test`.
LOAD_SECONDS ?= 60
load: $(BIN)/.installed
	$(BIN)/python bench/load.py --seconds $(LOAD_SECONDS) --connections 64

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
