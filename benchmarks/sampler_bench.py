"""Sampler step time on the GPU: the one-pass Gumbel kernel against the general torch path.

python benchmarks/sampler_bench.py

Random rows at temperature 1.0 (the offline-benchmark setting) over a 151,936-token vocabulary
(Qwen3) for several batch sizes; times per step from CUDA events over 50 steps.
"""

from __future__ import annotations

import json

import torch

import pagedllm.sample.sampler as sampler_mod
from pagedllm.sample.metadata import SamplingMetadata, SamplingRow
from pagedllm.sampling_params import SamplingParams


def time_us(fn, iters: int = 50) -> float:  # type: ignore[no-untyped-def]
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def main() -> None:
    vocab = 151_936
    sampler = sampler_mod.Sampler()
    general = sampler_mod._gumbel_ok
    for batch in (1, 32, 128, 256):
        logits = torch.randn(batch, vocab, device="cuda")
        params = SamplingParams(temperature=1.0)
        rows = [SamplingRow(params, [1], [], None) for _ in range(batch)]
        meta = SamplingMetadata.build(rows, vocab, "cuda")
        fast = time_us(lambda m=meta, x=logits: sampler(x, m))
        sampler_mod._gumbel_ok = lambda *a: False  # type: ignore[assignment]
        slow = time_us(lambda m=meta, x=logits: sampler(x, m))
        sampler_mod._gumbel_ok = general
        print(json.dumps({"batch": batch, "gumbel_us": round(fast, 1), "torch_us": round(slow, 1)}))


if __name__ == "__main__":
    main()
