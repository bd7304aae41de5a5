# Two entry points for a newcomer (see README):
#   make demo   set everything up, then run the whole pipeline on the embedded defaults
#   make test   set everything up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

# torch is pinned and installed first: any other torch request pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml setup.py platform/astromer/_kernels.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/python jobs/quickstart.py

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check platform ingest jobs tune benchmarks tests

clean:
	rm -rf $(VENV) .astromer
