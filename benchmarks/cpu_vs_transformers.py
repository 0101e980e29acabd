"""Offline throughput of pagedllm ``LLM.generate`` vs transformers ``generate``, same run.

Both get the same random prompts and generate exactly ``--output-len`` tokens (EOS ignored);
transformers runs batched with left padding (the fair way). Prints a JSON report.

    python benchmarks/cpu_vs_transformers.py --num-prompts 32 --input-len 64 --output-len 32
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from pagedllm import LLM, SamplingParams
from pagedllm.config import DEMO_MODEL_DIR


def run_transformers(model_dir: str, prompts: list[list[int]], out_len: int, batch: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = 0
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=out_len,
        min_new_tokens=out_len,
        eos_token_id=None,
        pad_token_id=pad,
    )
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(DEMO_MODEL_DIR))
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    llm = LLM(args.model, dtype="float32", device="cpu")
    vocab = llm.llm_engine.config.model_config.vocab_size
    prompts = torch.randint(10, vocab, (args.num_prompts, args.input_len)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)  # warm-up
    llm.llm_engine.scheduler.kv.pool.reset_prefix_cache()
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ours = time.perf_counter() - start
    theirs = run_transformers(args.model, prompts, args.output_len, args.hf_batch_size)
    out_tokens = args.num_prompts * args.output_len
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    report = {
        "workload": vars(args),
        "device": f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "commit": commit,
        "pagedllm_s": round(ours, 3),
        "transformers_s": round(theirs, 3),
        "pagedllm_out_tok_s": round(out_tokens / ours, 1),
        "transformers_out_tok_s": round(out_tokens / theirs, 1),
        "speedup": round(theirs / ours, 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
