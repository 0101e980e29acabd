#!/usr/bin/env bash
# One device call that measures what issue 4's targets need, section by section.
# Usage (repo root on the GPU machine, .whl and .carry/bench-models carried):
#   bash tools/gpu_measure.sh OUT_DIR SECTION...
# Sections: timeline-qwen (step timeline of the Qwen3-0.6B anchor workload),
#   profile-qwen (decode-step kernel table), latency-llama (bench latency 1/8/32/128),
#   throughput-llama (1000x1024/128 vs transformers on 256 of the prompts),
#   throughput-qwen (the Qwen3 anchor workload), sweep (decode attention configs), tests.
set -uo pipefail
out=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
M=.carry/bench-models
run_section() {
  local s=$1
  case $s in
    timeline-qwen) python3 tools/step_timeline.py $M/qwen3-0.6b ;;
    timeline-qwen-ab) for f in --no-gumbel "" --no-gumbel ""; do echo "-- $f"
        python3 tools/step_timeline.py $M/qwen3-0.6b $f 2>&1 | grep -v -i warn | head -10; done ;;
    profile-qwen) python3 tools/profile_step.py $M/qwen3-0.6b ;;
    latency-llama) python3 -m pagedllm.entrypoints.cli bench latency --model $M/llama-3-8b \
        --load-format dummy --batch-sizes 1,8,32,128 --input-len 512 --output-len 128 \
        --disable-tqdm --output-json "$out/latency-llama-3-8b.json" ;;
    throughput-llama) python3 -m pagedllm.entrypoints.cli bench throughput --model $M/llama-3-8b \
        --load-format dummy --num-prompts 1000 --input-len 1024 --output-len 128 \
        --max-num-seqs 512 --max-num-batched-tokens 16384 --baseline transformers \
        --hf-num-prompts 256 --hf-batch-size 128 --disable-tqdm \
        --output-json "$out/throughput-llama-3-8b.json" ;;
    throughput-qwen) python3 -m pagedllm.entrypoints.cli bench throughput --model $M/qwen3-0.6b \
        --load-format dummy --num-prompts 256 --input-len-range 101:1023 \
        --output-len-range 101:1023 --max-num-batched-tokens 8192 --disable-tqdm \
        --output-json "$out/throughput-qwen3-0.6b.json" ;;
    qwen-tokens-ab) for t in 8192 16384 8192 16384; do echo "max_num_batched_tokens $t"
        python3 -m pagedllm.entrypoints.cli bench throughput --model $M/qwen3-0.6b \
        --load-format dummy --num-prompts 256 --input-len-range 101:1023 \
        --output-len-range 101:1023 --max-num-batched-tokens $t --disable-tqdm \
        --output-json "/tmp/q$t.json" 2>&1 | grep "^| pagedllm"; done ;;
    throughput-qwen-x3) for i in 1 2 3; do run_section throughput-qwen | grep "^| pagedllm"; done ;;
    coldstart-llama) rm -rf ~/.triton/cache; python3 benchmarks/gpu_quick.py $M/llama-3-8b \
        --num-prompts 64 --input-len 128 --output-len 16 ;;
    sweep) python3 benchmarks/attn_sweep.py ;;
    sweep-layouts) for l in NHD HND; do
        python3 benchmarks/attn_sweep.py --quick --layout $l 2>&1 | grep -v -i warn; done ;;
    profile-llama-b1) python3 tools/profile_step.py $M/llama-3-8b --num-seqs 1 2>&1 \
        | grep -v -i warn | tail -24 ;;
    skinny) for m in llama-3-8b qwen3-0.6b; do python3 -c "import logging, sys
logging.basicConfig(level=logging.INFO)
from pagedllm import LLM
LLM(sys.argv[1], load_format='dummy', enforce_eager=True)" $M/$m 2>&1 | grep -A7 "Skinny GEMM"; done ;;
    ab-latency) python3 tools/ab_latency.py $M/llama-3-8b ;;
    serve) SECONDS_PER_RATE=30 bash tools/gpu_serve_bench.sh $M/llama-3-8b "$out" 4 8 16 ;;
    sampler) python3 benchmarks/sampler_bench.py ;;
    tests) python3 -m pytest -q -m gpu tests/kernels tests/engine/test_gpu_e2e.py ;;
  esac
}
for s in "$@"; do
  echo "=== $s  ($(date +%T))"
  run_section "$s" > "$out/$s.log" 2>&1
  grep -v -i warn "$out/$s.log" | tail -${TAIL:-40}
done
exit 0
