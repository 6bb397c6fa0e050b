# Two commands from a fresh machine: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PADDLE_PKG ?= paddlepaddle==3.3.1
# Paddle 2.6: PyPI's only paddlepaddle-gpu (2.6.2) and what many PaddleOCR 2.x / ppdet set-ups pin.
VENV26 := .venv-paddle26
BIN26 := $(VENV26)/bin
PADDLE26_PKG ?= paddlepaddle==2.6.2
# What `make test` runs under Paddle 2.6: the engine and Model.fit tests, and one end-to-end run per suite.
PADDLE26_TESTS ?= tests/test_engine.py tests/test_callback.py tests/test_config.py tests/test_files.py \
	tests/test_watch.py tests/test_examples.py tests/test_paddle_support.py tests/test_checkpoint_files.py \
	tests/test_ocr.py::test_rec_eval_metric_is_the_ema_metric_and_tools_use_the_ema_weights \
	tests/test_det.py::test_det_train_end_to_end
export PADDLEOCR_ROOT ?= $(abspath ../shared/third_party/PaddleOCR-2.10)
export PADDLEDET_ROOT ?= $(abspath ../shared/third_party/PaddleDetection-develop)
PIP := -m pip install -q --disable-pip-version-check

.PHONY: demo test test-paddle3 test-paddle26 soak bench venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BIN26)/python:
	$(PYTHON) -m venv $(VENV26)

# The demo's needs: paddle (CPU build), this package and the plot extra.
$(VENV)/.demo-installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python $(PIP) "$(PADDLE_PKG)" -e ".[plot]"
	touch $@

# The test extras: the demo's needs plus what PaddleOCR's and PaddleDetection's training code import.
$(VENV)/.test-installed: $(VENV)/.demo-installed setup.cfg
	$(BIN)/python $(PIP) "$(PADDLE_PKG)" -e ".[test]"
	touch $@

# The same extras under Paddle 2.6 (they pin numpy<2, which Paddle 2.6 needs).
$(VENV26)/.test-installed: $(BIN26)/python setup.cfg pyproject.toml
	$(BIN26)/python $(PIP) "$(PADDLE26_PKG)" -e ".[test]"
	touch $@

venv: $(VENV)/.test-installed

demo: $(VENV)/.demo-installed
	$(BIN)/ema-callback demo $(ARGS)

# The whole suite on Paddle 3.3.1, then the Paddle 2.6 subset.
test: test-paddle3 test-paddle26

test-paddle3: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-paddle26: $(VENV26)/.test-installed
	$(BIN26)/python -m pytest -q $(PADDLE26_TESTS)

soak: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -m soak -o addopts="" tests

# Paddle 3.3.1 on every model, checkpoint bytes per setting, then the Paddle 2.6 update path on the large models.
bench: $(VENV)/.test-installed $(VENV26)/.test-installed
	$(BIN)/python benchmarks/bench_update.py $(ARGS)
	$(BIN)/python benchmarks/checkpoint_sizes.py
	$(BIN26)/python benchmarks/bench_update.py --models resnet50,pp-ocrv4-rec --no-training --out bench_output/paddle26

clean:
	rm -rf $(VENV) $(VENV26) build *.egg-info demo_output
