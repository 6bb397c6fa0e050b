#!/usr/bin/env bash
# One command for a person with one NVIDIA GPU and internet access (about 5 minutes):
#   bash benchmarks/gpu_check.sh
# Installs paddlepaddle-gpu 3.3.1 (CUDA 12.6 wheels from PaddlePaddle's index) and this package's test
# extras into .venv-gpu, runs the tests marked `gpu` (device path with no host read, AMP O2 master weights,
# PaddleOCR's tiny recognizer on the GPU), then prints the update benchmark on the GPU and an AMP O2 check.
# PADDLE_GPU_INDEX / PADDLE_GPU_PKG / PADDLEOCR_ROOT / PADDLEDET_ROOT override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PADDLE_GPU_PKG:=paddlepaddle-gpu==3.3.1}"
: "${PADDLE_GPU_INDEX:=https://www.paddlepaddle.org.cn/packages/stable/cu126/}"
: "${PADDLEOCR_ROOT:=$(cd ../shared/third_party/PaddleOCR-2.10 2>/dev/null && pwd || echo)}"
: "${PADDLEDET_ROOT:=$(cd ../shared/third_party/PaddleDetection-develop 2>/dev/null && pwd || echo)}"
export PADDLEOCR_ROOT PADDLEDET_ROOT
python3 -m venv .venv-gpu
.venv-gpu/bin/python -m pip install -q --upgrade pip
.venv-gpu/bin/python -m pip install -q "$PADDLE_GPU_PKG" -i "$PADDLE_GPU_INDEX"
.venv-gpu/bin/python -m pip install -q -e ".[test]"
.venv-gpu/bin/python -c "import paddle; paddle.utils.run_check()"
echo "## Tests that need a GPU (pytest -m gpu)"
.venv-gpu/bin/python -m pytest -q -m gpu tests
echo "## EMA update on the GPU (ours vs floor vs naive loop vs ppdet ModelEMA)"
BENCH_DEVICE=gpu .venv-gpu/bin/python benchmarks/bench_update.py --reps 20 --out bench_gpu
echo "## AMP O2 training with EMA (PaddleOCR's scaler.minimize path, batch 128)"
.venv-gpu/bin/python benchmarks/gpu_amp_check.py --device gpu --batch 128
