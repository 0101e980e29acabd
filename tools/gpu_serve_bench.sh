#!/usr/bin/env bash
# One device call: start `pagedllm serve` on a dummy-weight model, time it to healthy, then
# `pagedllm bench serve` at several Poisson rates (random 1024 in / 128 out, as anchors.md).
# Usage: tools/gpu_serve_bench.sh MODEL_DIR OUT_DIR [RATE ...]
set -uo pipefail
model=$1; out=$2; shift 2
rates=${*:-4 8 16}
t0=$(date +%s.%N)
python3 -m pagedllm.entrypoints.cli serve "$model" --load-format dummy --dtype bfloat16 \
  --host 127.0.0.1 --port 8000 --disable-log-requests ${SERVE_ARGS:-} > "$out/server.log" 2>&1 &
srv=$!
python3 - <<'PY'
import time, urllib.request
for _ in range(1200):
    try:
        if urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=1).status == 200:
            break
    except Exception:
        time.sleep(0.25)
PY
echo "serve -> healthy: $(python3 -c "import time; print(round(time.time() - $t0, 1))") s"
for rate in $rates; do
  python3 -m pagedllm.entrypoints.cli bench serve --base-url http://127.0.0.1:8000 \
    --dataset-name random --random-input-len 1024 --random-output-len 128 \
    --num-prompts $((rate * ${SECONDS_PER_RATE:-40})) --request-rate "$rate" --ignore-eos --seed 0 \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 --disable-tqdm \
    --save-result --result-dir "$out" --result-filename "serve-rate$rate.json" 2>&1 \
    | grep -E "Request throughput|Output token|TTFT|TPOT|Failed|Successful"
done
kill -TERM $srv; wait $srv; echo "server exit: $?"
