"""Batch-1 latency of a GPTQ-Int4 model with dummy weights: one 512-token prompt, 128 tokens.

python benchmarks/gptq_latency.py [MODEL_DIR] [--iters 3] [--enforce-eager]

MODEL_DIR defaults to the Qwen2.5-14B-Instruct-GPTQ-Int4 config directory (config.json with
its ``quantization_config`` and the tokenizer, no weights): ``.carry/bench-models/
qwen2.5-14b-gptq`` if present, else ``/work/shared/bench-models/qwen2.5-14b-gptq``.
``--load-format dummy`` fills GPTQ's packed tensors as zeros (integers), the scales with
U(-1e-3, 1e-3) and keeps the default ``g_idx``, so the weight-only kernels read the real
number of bytes. The reference is vLLM's 1.152 s per request on the same shape (H200,
Machete / Marlin kernels); the target is at most 0.8x that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagedllm import LLM, SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIRS = (
    REPO / ".carry/bench-models/qwen2.5-14b-gptq",
    Path("/work/shared/bench-models/qwen2.5-14b-gptq"),
)
VLLM_S = 1.152


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()
    model = args.model or next((str(d) for d in DEFAULT_DIRS if d.is_dir()), None)
    if model is None:
        raise SystemExit(f"no model directory given and none of {DEFAULT_DIRS} exists")
    t0 = time.perf_counter()
    llm = LLM(
        model,
        load_format="dummy",
        max_model_len=args.input_len + args.output_len + 16,
        enforce_eager=args.enforce_eager,
    )
    init_s = time.perf_counter() - t0
    vocab = llm.llm_engine.config.model_config.arch.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, vocab - 100, (args.iters + 2, args.input_len), generator=gen)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    times = []
    for i, p in enumerate(prompts[:-1].tolist()):  # the first request warms up
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)
        if i:
            times.append(time.perf_counter() - t0)
        assert len(out[0].outputs[0].token_ids) == args.output_len
    # Prefill alone: a new prompt (no prefix-cache hit) and one output token.
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompts[-1].tolist()}], one, use_tqdm=False)
    prefill_s = time.perf_counter() - t0
    lat = statistics.median(times)
    res = {
        "model": model,
        "init_s": round(init_s, 1),
        "latency_s": round(lat, 4),
        "latencies_s": [round(t, 4) for t in times],
        "prefill_s": round(prefill_s, 4),
        "decode_ms_per_token": round((lat - prefill_s) / (args.output_len - 1) * 1e3, 3),
        "vs_vllm": round(lat / VLLM_S, 3),
        "target_met": lat <= 0.8 * VLLM_S,
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
