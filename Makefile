# `make demo` and `make test` set up .venv when needed (re-installing when pyproject.toml changes).
PYTHON ?= python3.11
VENV ?= .venv
STAMP := $(VENV)/.kiln-installed

.PHONY: setup demo test test-fast bench
setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job: train the CNN on MNIST with Ray Train on 2 workers, store it, print test accuracy.
demo: $(STAMP)
	$(VENV)/bin/kiln train cnn --workers 2

test: $(STAMP)
	$(VENV)/bin/python -m pytest

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow"

bench: $(STAMP)
	$(VENV)/bin/python bench/train_throughput.py
