# `make demo` and `make test` set up .venv when needed (re-installing when pyproject.toml changes).
PYTHON ?= python3.11
VENV ?= .venv
STAMP := $(VENV)/.kiln-installed

.PHONY: setup demo test test-fast bench
setup: $(STAMP)

# The gallery's browser tests drive the system's Chromium (Debian's chromium + chromium-driver),
# never a downloaded browser build; the serving tests run curl as TF Serving's docs do.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v curl >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "install chromium and its chromedriver with your package manager"; exit 1; }; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver curl; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	@# a .venv made when Kiln required tensorflow-cpu: it and tensorflow would share one folder
	$(VENV)/bin/python -m pip uninstall --quiet --yes tensorflow-cpu 2>/dev/null || true
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job: train the CNN on MNIST with Ray Train on 2 workers, store it, print test accuracy.
demo: $(STAMP)
	$(VENV)/bin/kiln train cnn --workers 2

# Two test processes: the tests that start Ray run in one, one after another, the others in
# whichever is free (tests/conftest.py). Every run ends with its 25 slowest steps and the kiln
# package's line coverage, so that growth shows in every CI log (the budget: README.md, "Tests").
test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadgroup --no-loadscope-reorder --durations=25 --cov=kiln --cov-report=term

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" --durations=10

bench: $(STAMP)
	$(VENV)/bin/python bench/train_throughput.py
