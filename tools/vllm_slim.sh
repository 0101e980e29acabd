#!/usr/bin/env bash
# vLLM 0.25 beside pagedllm on the GPU machine in five device calls instead of eight.
#
# The reference wheel (../shared/tools/vllm-reference) is 250 MB; 135 MB of it are three
# files a dense model on Hopper never loads, each of which vLLM imports optionally: the FA2
# kernels (vllm_flash_attn/_vllm_fa2_C: vLLM uses FA3 on sm90, and FA2 sits behind an
# ImportError guard), the MoE kernels (_moe_C_stable_libtorch: imported under
# contextlib.suppress(ImportError)) and the Rust frontend binary (vllm-rs: only with
# VLLM_USE_RUST_FRONTEND=1). Dropping them leaves the engine that runs Llama/Qwen dense
# models unchanged; check `vllm serve`'s log says FLASH_ATTN with FA3.
#
#   here:   tools/vllm_slim.sh pack VLLM_WHL EXTRAS_DIR BENCH_MODELS_DIR   -> .vs/p00 ... (git-ignored)
#           (EXTRAS_DIR: the wheels vLLM needs besides itself, with install.sh and
#           insurance.txt from the reference, plus xgrammar and the server's own wheels)
#   device: call K carries [".vs/p0K"]:   bash tools/vllm_slim.sh stage .vs/p0K
#           after the last part:          bash tools/vllm_slim.sh install
#           then PYTHONPATH=/tmp/site, models under /tmp/pl/pkg/bm, vLLM's bench.sh at /tmp/pl/pkg.
set -euo pipefail
case "$1" in
  pack)
    whl=$2 extras=$3 models=$4 work=$(mktemp -d)
    mkdir -p "$work/pkg/w2" "$work/pkg/bm"
    python3 - "$whl" "$work/pkg/$(basename "$whl")" << 'EOF'
import sys, zipfile
drop = {"vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/_moe_C_stable_libtorch.abi3.so",
        "vllm/vllm-rs"}
src, out = zipfile.ZipFile(sys.argv[1]), zipfile.ZipFile(sys.argv[2], "w")
for info in src.infolist():
    if info.filename in drop:
        continue
    data = src.read(info.filename)
    if info.filename.endswith(".dist-info/RECORD"):
        keep = [l for l in data.decode().splitlines() if l.split(",")[0] not in drop]
        data = ("\n".join(keep) + "\n").encode()
    out.writestr(info, data, compress_type=info.compress_type)
out.close()
EOF
    cp "$extras"/* "$work/pkg/w2/"
    cp -r "$models"/* "$work/pkg/bm/"
    cp ../shared/tools/vllm-reference/bench.sh "$work/pkg/" 2> /dev/null || true
    tar cf "$work/payload.tar" -C "$work/pkg" .
    rm -rf .vs && mkdir -p .vs
    grep -qxF "/.vs/" .git/info/exclude || echo "/.vs/" >> .git/info/exclude
    split -b 39m -d "$work/payload.tar" "$work/part."
    for f in "$work"/part.*; do d=.vs/p${f##*.}; mkdir -p "$d" && mv "$f" "$d/"; done
    rm -rf "$work"; du -sh .vs/* ;;
  stage) mkdir -p /tmp/pl && cp "$2"/part.* /tmp/pl/ ;;
  install)
    mkdir -p /tmp/pl/pkg && cat /tmp/pl/part.* | tar x -C /tmp/pl/pkg
    d=/tmp/pl/pkg/w2
    mv /tmp/pl/pkg/vllm-*.whl "$d/"
    sum=$(sha256sum "$d"/vllm-*.whl | cut -d' ' -f1)
    sed "s/^VLLM_SHA256=.*/VLLM_SHA256=\"$sum\"/" "$d/install.sh" > /tmp/pl/install.sh
    SKIP_SMOKE=${SKIP_SMOKE:-1} bash /tmp/pl/install.sh "$d" /tmp/site 2>&1 | grep -v "^  " ;;
  *) echo "usage: $0 pack|stage|install ..." >&2; exit 2 ;;
esac
