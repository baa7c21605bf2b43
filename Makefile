# Two commands on a fresh machine (see README):
#   make demo   installs psm into .venv and runs `psm demo` (toy data, local CPU)
#   make test   installs psm with its test extras and runs ruff + the test suite
#
# The install pins the small CPU build of torch 2.13.0. With a GPU, install your own torch
# build first and use `make TORCH= demo`.
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.psm-base: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH) -e .
	touch $@

$(VENV)/.psm-test: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH) -e '.[test]'
	touch $@

demo: $(VENV)/.psm-base
	$(BIN)/psm demo

test: $(VENV)/.psm-test
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/pytest -n 2 -q

lint: $(VENV)/.psm-test
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

bench: $(VENV)/.psm-test
	$(BIN)/psm bench train

clean:
	rm -rf $(VENV) psm-demo bench-out .pytest_cache .ruff_cache
