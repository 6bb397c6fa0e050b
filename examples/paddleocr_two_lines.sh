#!/usr/bin/env bash
# PaddleOCR in two lines: add an EMA: section to the YAML (or pass --ema-config), and replace
#   python tools/train.py -c cfg.yml -o K=V
# by
#   ema-callback ocr-train -c cfg.yml -o K=V --paddleocr-root $PADDLEOCR_ROOT
# This script runs it on the tiny recognizer of configs/paddleocr/ with synthetic data (CPU, ~1 minute).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PADDLEOCR_ROOT:=$(cd ../shared/third_party/PaddleOCR-2.10 && pwd)}"
export PADDLEOCR_ROOT
PY=${PY:-.venv/bin/python}
$PY -c "from ema_callback.demo.text_lines import write_rec_dataset as w; w('train_data/tiny_rec', 128, 1, min_len=1, max_len=3); w('train_data/tiny_rec_val', 32, 2, min_len=1, max_len=3)"
# 1. train with EMA (the YAML has an EMA: section; -o EMA.* works even without one)
$PY -m ema_callback.cli ocr-train -c configs/paddleocr/tiny_rec_ctc.yml -o Global.epoch_num=3 EMA.decay=0.95
# 2. PaddleOCR's own tools use the EMA weights saved in output/tiny_rec_ctc/best_accuracy.pdparams
$PY "$PADDLEOCR_ROOT/tools/eval.py" -c configs/paddleocr/tiny_rec_ctc.yml -o Global.checkpoints=output/tiny_rec_ctc/best_accuracy
$PY "$PADDLEOCR_ROOT/tools/export_model.py" -c configs/paddleocr/tiny_rec_ctc.yml \
    -o Global.checkpoints=output/tiny_rec_ctc/best_accuracy Global.save_inference_dir=output/tiny_rec_ctc/inference
# 3. resume: raw weights, optimizer and the EMA with its update count
$PY -m ema_callback.cli ocr-train -c configs/paddleocr/tiny_rec_ctc.yml -o Global.epoch_num=4 \
    Global.checkpoints=output/tiny_rec_ctc/latest
# 4. two processes (CPU/gloo here; GPUs the same way): the launcher takes a script path
$PY -m paddle.distributed.launch --nproc_per_node 2 "$($PY -m ema_callback.cli script-path ocr)" \
    -c configs/paddleocr/tiny_rec_ctc.yml -o Global.epoch_num=2 Global.save_model_dir=output/tiny_rec_ctc_2proc/
