"""Profile engine steps on the GPU: kernel time by name for prefill-heavy and decode steps.

python tools/profile_step.py MODEL_DIR [--enforce-eager] [-tp N] [--num-seqs N]

With -tp > 1 the table is rank 0's, and the share of NCCL kernels (the all-reduces) in the
decode step's GPU time is printed.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    args = ap.parse_args()
    llm = LLM(
        args.model,
        load_format="dummy",
        max_num_batched_tokens=8192,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    eng = llm.llm_engine
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for _ in range(args.num_seqs):
        eng.add_request(None, torch.randint(100, 30000, (1024,), generator=g).tolist(), params)
    for _ in range(3):
        eng.step()  # warm-up (prefill steps)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(3):
            eng.step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / 3
    print(f"== prefill steps (8192 tokens): {dt * 1e3:.1f} ms/step wall")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
    )
    while eng.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running
    ):
        eng.step()
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    n = len(eng.scheduler.running)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(10):
            eng.step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / 10
    print(f"== decode steps (batch {n}): {dt * 1e3:.2f} ms/step wall")
    events = prof.key_averages()
    total = sum(e.self_device_time_total for e in events)
    nccl = sum(e.self_device_time_total for e in events if "nccl" in e.key.lower())
    if total:
        print(f"== all-reduce (NCCL kernels) share of decode GPU time: {nccl / total:.1%}")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
    )
    t0 = time.perf_counter()
    for _ in range(10):
        eng.step()
    print(f"== decode steps, no profiler: {(time.perf_counter() - t0) * 100:.2f} ms/step")
    eng.shutdown()


if __name__ == "__main__":
    main()
