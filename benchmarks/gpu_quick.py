"""Quick GPU smoke benchmark: offline throughput and batch-1 decode on a dummy-weight model.

python benchmarks/gpu_quick.py MODEL_DIR --num-prompts 1000 --input-len 1024 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pagedllm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--latency", action="store_true", help="also batch-1 512/128 latency")
    args = ap.parse_args()
    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        load_format="dummy",
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
    )
    init_s = time.perf_counter() - t0
    vocab = llm.llm_engine.config.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, vocab - 100, (args.num_prompts, args.input_len), generator=g)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], params, use_tqdm=False)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts.tolist()], params, use_tqdm=False)
    el = time.perf_counter() - t0
    n = args.num_prompts
    res = {
        "init_s": round(init_s, 1),
        "elapsed_s": round(el, 2),
        "req_s": round(n / el, 2),
        "out_tok_s": round(n * args.output_len / el),
        "total_tok_s": round(n * (args.input_len + args.output_len) / el),
        "preemptions": llm.llm_engine.scheduler.num_preemptions,
        "kv_blocks": llm.llm_engine.scheduler.kv.pool.num_blocks,
    }
    if args.latency:
        p512 = prompts[0, :512].tolist()
        lat = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p512}], lat, use_tqdm=False)
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompts[1, :512].tolist()}], lat, use_tqdm=False)
        res["batch1_512_128_s"] = round(time.perf_counter() - t0, 3)
        res["batch1_decode_tok_s"] = round(128 / res["batch1_512_128_s"], 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
