#!/usr/bin/env bash
# One device call: GPU kernel + end-to-end tests, then a quick benchmark. Run from the repo root
# on the GPU machine with .carry/bench-models carried.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -m gpu tests/kernels tests/engine/test_gpu_e2e.py -x 2>&1 | tail -25
for args in "$@"; do
  echo "== bench $args"
  python3 benchmarks/gpu_quick.py $args 2>&1 | grep -v Warning | tail -5
done
