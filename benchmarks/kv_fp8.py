"""fp8 KV cache vs the model's dtype: long prompts, many requests, dummy weights (GPU).

python benchmarks/kv_fp8.py MODEL_DIR [--num-prompts 256] [--input-len 7936] [--output-len 256]
                                      [--arms auto,fp8] [key=value ...]   (extra LLM kwargs)

Runs each ``--kv-cache-dtype`` arm in its own subprocess (a fresh GPU, so the pools are sized
the same way), 256 requests of 7936 random prompt tokens + 256 output tokens (8192 in all:
Llama-3-8B's context) with ``ignore_eos``, once untimed on a few requests first (Triton
compiles), then timed. The KV pool bounds how many such requests run at once, so the fp8 arm,
whose pool holds twice the tokens, should batch about twice as many. Prints one JSON object:
per arm the pool (blocks, tokens, GiB), the scales' origin, elapsed seconds, output and total
tok/s, and the fp8/auto throughput ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _arm(args: argparse.Namespace, extra: dict[str, object]) -> dict[str, object]:
    import random

    from pagedllm import LLM, SamplingParams

    llm = LLM(args.model, load_format="dummy", kv_cache_dtype=args.arm, **extra)
    runner = llm.llm_engine.runner
    rng = random.Random(0)
    vocab = runner.vocab_size

    def prompts(n: int) -> list[dict[str, list[int]]]:
        return [
            {"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.input_len)]}
            for _ in range(n)
        ]

    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts(4), params, use_tqdm=False)  # compile, warm the allocator
    batch = prompts(args.num_prompts)
    start = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    spec = runner.kv_spec
    sources = sorted({a.kv_scale_source for a in runner.attn_layers})
    return {
        "kv_cache_dtype": args.arm,
        "kv_dtype": spec.dtype,
        "kv_blocks": runner.num_blocks,
        "kv_pool_tokens": runner.num_blocks * spec.block_size,
        "kv_pool_gib": round(runner.num_blocks * spec.bytes_per_block / 2**30, 2),
        "kv_scales": sources if spec.is_fp8 else None,
        "elapsed_s": round(elapsed, 2),
        "output_tok_s": round(out_tokens / elapsed, 1),
        "total_tok_s": round((out_tokens + args.num_prompts * args.input_len) / elapsed, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=7936)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--arms", default="auto,fp8")
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # set in the child processes
    args, rest = ap.parse_known_args()
    extra: dict[str, object] = {}
    for item in rest:
        key, value = item.split("=", 1)
        extra[key] = int(value) if value.lstrip("-").isdigit() else value
    if args.arm is not None:
        print("RESULT " + json.dumps(_arm(args, extra)), flush=True)
        return
    results = {}
    for arm in args.arms.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--arm", arm]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"arm {arm} failed (exit {proc.returncode})")
        results[arm] = json.loads(lines[-1].removeprefix("RESULT "))
    if "auto" in results and "fp8" in results:
        a, f = results["auto"], results["fp8"]
        results["fp8_over_auto"] = {
            "throughput": round(f["total_tok_s"] / a["total_tok_s"], 3),
            "pool_tokens": round(f["kv_pool_tokens"] / a["kv_pool_tokens"], 3),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
