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
PADDLE26_TESTS ?= tests/test_engine.py tests/test_callback.py tests/test_config.py tests/test_checkpoint_io.py tests/test_horizon.py \
	tests/test_bn_and_switch.py tests/test_bn_recorder.py tests/test_store_parity.py tests/test_posthoc.py tests/test_posthoc_math.py \
	tests/test_optimizer_steps.py tests/test_examples.py tests/test_paddle_support.py tests/test_checkpoint_files.py tests/test_device_path.py \
	tests/test_checkpoint_set.py tests/test_resume_paths.py tests/test_finite_check.py \
	tests/test_ocr.py::test_rec_eval_metric_is_the_ema_metric_and_tools_use_the_ema_weights \
	tests/test_det.py::test_det_train_end_to_end \
	tests/test_cls.py::test_raw_and_ema_side_by_side_and_eval_reproduces_best_model
# The suite checkouts the end-to-end tests train with: $PADDLEOCR_ROOT / $PADDLEDET_ROOT if set, else the copies in
# ../shared/third_party, else clones of the pinned commits fetched into $(CHECKOUT_CACHE) by `make checkouts`.
SHARED_THIRD_PARTY ?= $(abspath ../shared/third_party)
CHECKOUT_CACHE ?= $(abspath .checkouts)
PADDLEOCR_GIT ?= https://github.com/PaddlePaddle/PaddleOCR.git
PADDLEOCR_COMMIT ?= e218c0a35fbc
PADDLEDET_GIT ?= https://github.com/PaddlePaddle/PaddleDetection.git
PADDLEDET_COMMIT ?= 666f597fd00d
PADDLECLAS_GIT ?= https://github.com/PaddlePaddle/PaddleClas.git
PADDLECLAS_COMMIT ?= d178931fca43
export PADDLEOCR_ROOT ?= $(firstword $(wildcard $(SHARED_THIRD_PARTY)/PaddleOCR-2.10) $(CHECKOUT_CACHE)/PaddleOCR)
export PADDLEDET_ROOT ?= $(firstword $(wildcard $(SHARED_THIRD_PARTY)/PaddleDetection-develop) $(CHECKOUT_CACHE)/PaddleDetection)
export PADDLECLAS_ROOT ?= $(firstword $(wildcard $(SHARED_THIRD_PARTY)/PaddleClas-develop) $(CHECKOUT_CACHE)/PaddleClas)
PIP := -m pip install -q --disable-pip-version-check

.PHONY: demo docs docs-machine lint test test-fast test-paddle3 test-paddle26 soak bench bench-auto bench-nlp venv clean checkouts skipped-suites

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BIN26)/python:
	$(PYTHON) -m venv $(VENV26)

# The demo's needs: paddle (CPU build), this package and the plot extra.
$(VENV)/.demo-installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python $(PIP) "$(PADDLE_PKG)" -e ".[plot]"
	touch $@

# The test extras: the demo's needs plus what PaddleOCR's and PaddleDetection's training code import, and PaddleNLP.
$(VENV)/.test-installed: $(VENV)/.demo-installed setup.cfg
	$(BIN)/python $(PIP) "$(PADDLE_PKG)" -e ".[test,nlp]"
	touch $@

# The same extras under Paddle 2.6 (they pin numpy<2, which Paddle 2.6 needs).
$(VENV26)/.test-installed: $(BIN26)/python setup.cfg pyproject.toml
	$(BIN26)/python $(PIP) "$(PADDLE26_PKG)" -e ".[test]"
	touch $@

venv: $(VENV)/.test-installed

demo: $(VENV)/.demo-installed
	$(BIN)/ema-callback demo $(ARGS)

# The hostile-file corpus's figures (docs/hostile_files.json), the demo (defaults: length auto, seed 7; then seeds 1-6)
# and its several-EMA and --posthoc variants: docs/demo_*.json, the figures and every generated block of README.md and
# docs/ (about 14 minutes).
docs: $(VENV)/.test-installed
	HOSTILE_REPORT=docs/hostile_files.json $(BIN)/python -m pytest -q -p no:xdist tests/test_hostile_files.py
	$(BIN)/python docs/regenerate.py --seeds 1,2,3,4,5,6,7

# The default demo on seeds 1-7 on this machine, kept beside the figures' own machine (docs/demo_seeds_<cpu>.json):
# the README's spread then names both (about 10 minutes; nothing else in docs/ changes).
docs-machine: $(VENV)/.test-installed
	$(BIN)/python docs/regenerate.py --no-run --seeds 1,2,3,4,5,6,7 --seeds-file machine

# ruff (pyflakes, pycodestyle, import order; pyproject.toml) and mypy on the public API as a user calls it: the
# annotations of ema_callback's public names against tests/typecheck/public_api_usage.py.
lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/mypy --ignore-missing-imports --follow-imports=silent --disallow-untyped-calls tests/typecheck/public_api_usage.py

# Lint, the whole suite on Paddle 3.3.1, then the Paddle 2.6 subset; last, one line per suite whose tests were skipped.
test: checkouts lint test-paddle3 test-paddle26
	@$(MAKE) --no-print-directory skipped-suites

# Two pytest workers (2 cores): each suite's module on one worker (its fixtures built once), 2-process
# launches one at a time (xdist_group marks). PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadgroup)

test-paddle3: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q $(XDIST) --durations=8 $(PYTEST_ARGS)

test-paddle26: $(VENV26)/.test-installed
	$(BIN26)/python -m pytest -q $(XDIST) $(PADDLE26_TESTS)

# Clone a suite at its pinned commit when its root is the cache folder and holds no checkout yet (a failure only
# warns: its tests skip). A root set by the user, or ../shared, is never written to.
define fetch_checkout
	@if [ ! -f "$(1)/tools/train.py" ] && [ "$(1)" = "$(CHECKOUT_CACHE)/$(4)" ]; then \
	  echo "fetching $(4) $(3) from $(2) into $(1)"; rm -rf "$(1)"; mkdir -p "$(dir $(1))"; \
	  if ! (GIT_TERMINAL_PROMPT=0 timeout 900 git clone -q "$(2)" "$(1)" && git -C "$(1)" checkout -q "$(3)"); then \
	    rm -rf "$(1)"; echo "make: could not fetch $(4) from $(2) at $(3); its end-to-end tests will be skipped"; fi; \
	fi
endef

checkouts:
	$(call fetch_checkout,$(PADDLEOCR_ROOT),$(PADDLEOCR_GIT),$(PADDLEOCR_COMMIT),PaddleOCR)
	$(call fetch_checkout,$(PADDLEDET_ROOT),$(PADDLEDET_GIT),$(PADDLEDET_COMMIT),PaddleDetection)
	$(call fetch_checkout,$(PADDLECLAS_ROOT),$(PADDLECLAS_GIT),$(PADDLECLAS_COMMIT),PaddleClas)

skipped-suites:
	@[ -f "$(PADDLEOCR_ROOT)/tools/train.py" ] || echo "make test: the PaddleOCR end-to-end tests were SKIPPED: no checkout at $(PADDLEOCR_ROOT); set PADDLEOCR_ROOT=/path/to/PaddleOCR (release/2.10 or 3.x) or let make fetch $(PADDLEOCR_GIT)"
	@[ -f "$(PADDLECLAS_ROOT)/tools/train.py" ] || echo "make test: the PaddleClas end-to-end tests were SKIPPED: no checkout at $(PADDLECLAS_ROOT); set PADDLECLAS_ROOT=/path/to/PaddleClas or let make fetch $(PADDLECLAS_GIT)"
	@[ -f "$(PADDLEDET_ROOT)/tools/train.py" ] || echo "make test: the PaddleDetection end-to-end tests were SKIPPED: no checkout at $(PADDLEDET_ROOT); set PADDLEDET_ROOT=/path/to/PaddleDetection or let make fetch $(PADDLEDET_GIT)"

# The edit-test loop: everything but the end-to-end suite runs, the 2-process launches and the kill/demo runs.
test-fast: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -m "not slow and not distributed and not soak" $(PYTEST_ARGS)

soak: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -m soak -o addopts="" tests

# Paddle 3.3.1 on every model, checkpoint bytes per setting, then the Paddle 2.6 update path on the large models;
# their tables go to docs/ and into docs/performance.md (docs/regenerate.py --no-run).
bench: $(VENV)/.test-installed $(VENV26)/.test-installed
	$(BIN)/python benchmarks/bench_update.py --reps 15 $(ARGS)
	$(BIN)/python benchmarks/checkpoint_sizes.py
	$(BIN26)/python benchmarks/bench_update.py --reps 15 --models resnet50,pp-ocrv4-rec,picodet-xs --device-models '' \
		--several-models '' --no-training --out bench_output/paddle26
	cp bench_output/tables.md docs/bench_cpu.md; cp bench_output/results.json docs/bench_cpu.json
	cp bench_output/checkpoint_sizes.md bench_output/checkpoint_sizes.json docs/
	cp bench_output/paddle26/tables.md docs/bench_cpu_paddle26.md; cp bench_output/paddle26/results.json docs/bench_cpu_paddle26.json
	$(BIN)/python docs/regenerate.py --no-run

# length: auto against a held-out split it never saw (issue 26): the demo task on seeds 1-7 (about 15 minutes),
# then a PaddleOCR recognizer from an upstream config shrunk to CPU on 3 seeds (about 30 minutes; skipped without a
# checkout);
# the tables go to docs/auto_length.{md,json} and into docs/ (docs/regenerate.py --no-run).
bench-auto: $(VENV)/.test-installed checkouts
	$(BIN)/python benchmarks/auto_length.py --seeds 1,2,3,4,5,6,7 --out bench_output/auto
	cp bench_output/auto/auto_length.md bench_output/auto/auto_length.json docs/
	$(BIN)/python benchmarks/auto_length_ocr.py --seeds 1,2,3 --paddleocr-root "$(PADDLEOCR_ROOT)" --out bench_output/auto_ocr
	[ ! -f bench_output/auto_ocr/auto_length_ocr.md ] || cp bench_output/auto_ocr/auto_length_ocr.md bench_output/auto_ocr/auto_length_ocr.json docs/
	$(BIN)/python docs/regenerate.py --no-run

# PaddleNLP's Trainer: UIE span extraction, raw against EMA on the same runs, seeds 1-7 (benchmarks/uie_ema.py);
# the table goes to docs/uie_ema.{md,json} and into docs/paddlenlp.md (docs/regenerate.py --no-run).
bench-nlp: $(VENV)/.test-installed
	$(BIN)/python benchmarks/uie_ema.py --seeds 1,2,3,4,5,6,7 --out bench_output/uie $(ARGS)
	cp bench_output/uie/uie_ema.md bench_output/uie/uie_ema.json docs/
	$(BIN)/python docs/regenerate.py --no-run

clean:
	rm -rf $(VENV) $(VENV26) build *.egg-info demo_output
	@echo "kept $(CHECKOUT_CACHE) (fetched suite checkouts); remove it by hand to fetch again"
