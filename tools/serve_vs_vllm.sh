#!/usr/bin/env bash
# pagedllm serve and vLLM 0.25 serve side by side on one GPU, one after the other, Llama-3-8B
# dummy weights, each at its defaults; client for both: vllm bench serve --backend openai,
# random 1024 in / 128 out, Poisson RATE req/s, RATE * PER_RATE_S (default 30) prompts.
# Needs vLLM installed as ../shared/tools/vllm-reference says (PYTHONPATH=/tmp/site), plus the
# server's own wheels there: cryptography, cffi and pycparser (PyJWT[crypto]) besides what the
# vLLM install brings.
# Usage: tools/serve_vs_vllm.sh MODEL_DIR OUT_DIR [RATE ...]   (WHO="pagedllm vllm" by default)
# CLIENT=structured: instead of the rates, the structured-output arms of issue 10 with
# pagedllm's own client (chat, 64 concurrent, 512 in / 256 out): free, every request on the
# ticket schema, every request on a schema of its own (compiled anew), and half constrained
# (SO_ARMS="none 1|ticket 0.5" picks arms). PAGEDLLM_ENGINE_CPROFILE=FILE profiles our engine.
set -uo pipefail
model=$(cd "$1" && pwd); out=$2; shift 2; rates=${*:-8 16}
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH VLLM_USE_FLASHINFER_SAMPLER=0 \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
for who in ${WHO:-pagedllm vllm}; do
  if [ "$who" = vllm ]; then
    setsid vllm serve "$model" --load-format dummy --port 8011 --host 127.0.0.1 \
      > "$out/vllm_serve.log" 2>&1 &
  else
    PYTHONPATH=/tmp/site:$repo setsid python3 -m pagedllm.entrypoints.cli serve "$model" \
      --load-format dummy --port 8011 --host 127.0.0.1 --served-model-name "$model" \
      > "$out/pagedllm_serve.log" 2>&1 &
  fi
  leader=$!
  up=0
  for i in $(seq 1 300); do
    curl -sf http://127.0.0.1:8011/health > /dev/null && { up=1; break; }
    kill -0 $leader 2> /dev/null || break  # the server died: say so, do not wait 300 s
    sleep 1
  done
  echo "$who: healthy=$up after ${i}s"
  if [ $up = 1 ] && [ "${CLIENT:-vllm}" = structured ]; then
    bench="python3 -m pagedllm.entrypoints.cli bench serve --base-url http://127.0.0.1:8011
      --model $model --endpoint /v1/chat/completions --max-concurrency 64 --num-prompts 128
      --random-input-len 512 --random-output-len 256 --ignore-eos --disable-tqdm"
    PYTHONPATH=/tmp/site:$repo $bench --num-prompts 64 > /dev/null 2>&1  # warm-up
    IFS='|' read -ra arms <<< "${SO_ARMS:-none 1|ticket 1|ticket-new 1|ticket 0.5}"
    for arm in "${arms[@]}"; do
      set -- $arm
      PYTHONPATH=/tmp/site:$repo $bench --structured-output $1 --structured-output-ratio $2 \
        --save-result --result-dir "$out" --result-filename "${who}_so_$1_$2.json" 2>&1 \
        | grep -E "Output token throughput|Median TTFT|Median TPOT|requests \(|failed" \
        | sed "s/^/$who $1 $2: /"
    done
  elif [ $up = 1 ]; then
    for rate in $rates; do
      vllm bench serve --backend openai --base-url http://127.0.0.1:8011 --model "$model" \
        --dataset-name random --random-input-len 1024 --random-output-len 128 \
        --num-prompts $((rate * ${PER_RATE_S:-30})) --request-rate "$rate" --ignore-eos \
        --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 --save-result \
        --result-dir "$out" --result-filename "${who}_rate$rate.json" 2>&1 \
        | grep -E "Request throughput|Median TTFT|P99 TTFT|Median TPOT|P99 TPOT|Error" \
        | sed "s/^/$who rate=$rate /"
    done
  else
    tail -5 "$out/${who}_serve.log"
  fi
  # setsid made the server a process-group leader: end the whole group (engine processes too),
  # so the next server gets the GPU.
  kill -TERM -- -$leader 2> /dev/null; sleep 10; kill -KILL -- -$leader 2> /dev/null; sleep 2
done
