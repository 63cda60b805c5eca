# Two commands from the README: `make demo` and `make test`. Both call `setup` first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench bench-test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first: the CPU wheel on this disk; a bare `torch` would pull GBs of CUDA packages
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# demo_output/ is the demo's own folder: `make demo` (re)creates its runs
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/lpdseg demo --out demo_output --overwrite

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py

# tests of the benchmark scripts (kept out of `make test`: tests/ never imports benchmarks/)
bench-test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest benchmarks/tests

# ruff, then the layer contracts in pyproject.toml ([tool.importlinter]): an upward import fails
lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) demo_output .pytest_cache
