"""Batch-1 decode A/B in one process: the Triton sampler/skinny lm_head on vs off.

python tools/ab_latency.py MODEL_DIR [--rounds 3] [--iters 5]

Alternates the two settings (same engine, same CUDA graphs; both switches act outside the
graphs) so clock drift between GPUs or runs cancels out. Prints ms per request (512 in /
128 out, greedy) per round and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import pagedllm.sample.sampler as sampler_mod
from pagedllm import LLM, SamplingParams
from pagedllm.worker.linear_tuning import skinny_layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    llm = LLM(args.model, load_format="dummy")
    linears = skinny_layers(llm.llm_engine.runner.model)
    tuned = {id(m): m.skinny_max_rows for m in linears}
    gumbel_ok = sampler_mod._gumbel_ok
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)

    def one() -> float:
        ids = torch.randint(100, 30000, (512,), generator=g).tolist()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def setting(on: bool) -> None:
        sampler_mod._gumbel_ok = gumbel_ok if on else (lambda *a: False)
        for m in linears:
            m.skinny_max_rows = tuned[id(m)] if on else 0

    res: dict[str, list[float]] = {"triton": [], "torch": []}
    for _ in range(args.rounds):
        for name, on in (("triton", True), ("torch", False)):
            setting(on)
            one()
            res[name] += [one() * 1e3 for _ in range(args.iters)]
    out = {k: round(statistics.median(v), 2) for k, v in res.items()}
    print(json.dumps({"median_ms_per_request": out, "samples": res}))


if __name__ == "__main__":
    main()
