#!/usr/bin/env bash
# The GPU check of issue 10 (a follow-up of bench/results/2026-11-28-h200.json), one prepared run on a lent CUDA machine:
#   bash bench/gpu_check.sh            # from the repo root; results under $OUT (default /tmp/gpu_check_out)
# The device image has torch, lightning and onnxruntime but not hydra-core/omegaconf/antlr4; carry:
#   .whl/      hydra_core-1.3.8, omegaconf-2.3.1 and antlr4_python3_runtime-4.9.3 wheels
#              (make them here: python -m pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1
#               antlr4-python3-runtime==4.9.3)
#   .gpudata/  the four Fashion-MNIST *-ubyte.gz files (cp /usr/share/datasets/fashion-mnist/*.gz .gpudata/)
# About 5 minutes on an H200: cold run (70k extracted, 10 head epochs, test), warm run, head epoch timing.
set -euo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia-smi.csv" 2>&1 || true
python3 bench/gpu_check.py --data .gpudata --workdir /tmp/fmnist_gpu_check --out "$OUT" 2>"$OUT/gpu_check.stderr"
