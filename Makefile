# Two commands from a fresh machine: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PADDLE_PKG ?= paddlepaddle==3.3.1
export PADDLEOCR_ROOT ?= $(abspath ../shared/third_party/PaddleOCR-2.10)
export PADDLEDET_ROOT ?= $(abspath ../shared/third_party/PaddleDetection-develop)
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: demo test soak bench venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The demo's needs: paddle (CPU build), this package and the plot extra.
$(VENV)/.demo-installed: $(BIN)/python setup.cfg pyproject.toml
	$(PIP) "$(PADDLE_PKG)" -e ".[plot]"
	touch $@

# The test extras: the demo's needs plus what PaddleOCR's and PaddleDetection's training code import.
$(VENV)/.test-installed: $(VENV)/.demo-installed setup.cfg
	$(PIP) "$(PADDLE_PKG)" -e ".[test]"
	touch $@

venv: $(VENV)/.test-installed

demo: $(VENV)/.demo-installed
	$(BIN)/ema-callback demo $(ARGS)

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

soak: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -m soak -o addopts="" tests

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/bench_update.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info demo_output
