# Two entry points: `make quickstart` (the main job) and `make test` (the test suite).
# Both create .venv on first use and re-use it afterwards.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.evl-installed

.PHONY: install quickstart test test-fast lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first: the CPU wheel 2.13.0 when no torch is present (a GPU user's CUDA torch is kept).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/evl quickstart

test: $(STAMP)
	$(BIN)/python -m pytest tests

# the fast tier while editing (under a minute on 2 cores): everything but the end-to-end runs marked slow
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
