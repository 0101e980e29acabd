#!/usr/bin/env bash
# This session's device calls, section by section (repo root on the GPU machine).
# Carry [".vc/w2", ".carry"] (server wheels, cryptography, bench model configs).
# Usage: bash tools/gpu_session.sh OUT_DIR SECTION...
# Sections: tests, int4sweep, tp-thr, tp-lat, tp-prof, kvfp8, gptq, lang,
#   vllm-tp (after tools/vllm_slim.sh install), vllm-gptq.
set -uo pipefail
out=$1; shift
mkdir -p "$out"
if [ ! -d /tmp/site/zmq ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    .vc/w2/*.whl .carry/whl/*.whl 2>&1 | tail -1
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1 VLLM_USE_FLASHINFER_SAMPLER=0
M=$PWD/.carry/bench-models
cli="python3 -m pagedllm.entrypoints.cli"
thr() {  # tag tp [flags]: Llama-3-8B 1000 x 1024/128, pagedllm at its defaults
  local tag=$1 tp=$2; shift 2
  $cli bench throughput --model $M/llama-3-8b --load-format dummy --num-prompts 1000 \
    --input-len 1024 --output-len 128 -tp "$tp" --disable-tqdm "$@" \
    --output-json "$out/thr-$tag.json" 2>&1 | grep -E "^\| pagedllm|Error|error" | tail -3
}
for s in "$@"; do
  echo "=== $s $(date +%T)"
  case $s in
    tests) timeout 420 python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/executor \
        tests/kernels tests/sample tests/layers tests/worker tests/engine/test_gpu_e2e.py \
        tests/engine/test_gpu_features.py 2>&1 | tail -25 ;;
    int4sweep) timeout 240 python3 benchmarks/int4_sweep.py "$out/int4_sweep.json" 2>&1 | tail -40 ;;
    tp-thr) thr tp1 1; thr tp2 2 ;;
    tp-lat) for tp in 1 2; do $cli bench latency --model $M/llama-3-8b --load-format dummy \
        --batch-sizes 1 --input-len 512 --output-len 128 -tp $tp --disable-tqdm \
        --output-json "$out/lat-tp$tp.json" 2>&1 | grep -E "^\||Error|error" | tail -4; done ;;
    tp-prof) timeout 300 python3 tools/profile_step.py $M/llama-3-8b -tp 2 --num-seqs 64 2>&1 \
        | grep -E "^==|nccl|Name" | head -20 ;;
    kvfp8) timeout 400 python3 benchmarks/kv_fp8.py $M/llama-3-8b 2>&1 | tail -15 ;;
    gptq) timeout 300 python3 benchmarks/gptq_latency.py $M/qwen2.5-14b-gptq 2>&1 | tail -15 ;;
    lang) timeout 400 $cli bench lang --model-config llama-3-8b --load-format dummy \
        --disable-tqdm --output-json "$out/lang.json" 2>&1 | tail -25 ;;
    vllm-tp) for tp in 2; do vllm bench throughput --model /tmp/pl/pkg/bm/llama-3-8b \
        --load-format dummy --dataset-name random --random-input-len 1024 --random-output-len 128 \
        --num-prompts 1000 -tp $tp --output-json "$out/vllm-thr-tp$tp.json" 2>&1 \
        | grep -E "^Throughput|Error" ; done ;;
    vllm-lat) for tp in 2; do vllm bench latency --model /tmp/pl/pkg/bm/llama-3-8b \
        --load-format dummy --batch-size 1 --input-len 512 --output-len 128 -tp $tp \
        --num-iters-warmup 2 --num-iters 5 2>&1 | grep -E "Avg latency|Error"; done ;;
    *) echo "unknown section $s" ;;
  esac
done
