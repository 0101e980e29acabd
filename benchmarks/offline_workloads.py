"""The issue-9 offline workloads on dummy weights, at pagedllm's defaults unless told otherwise.

python benchmarks/offline_workloads.py WORKLOAD MODEL_DIR [key=value ...]   (LLM keyword args)

WORKLOAD:
  qwen     256 requests, prompt and output lengths uniform in [101, 1023]; output tok/s
           (vLLM: vllm bench throughput --random-input-len 562 --random-output-len 562
           --random-range-ratio 0.82 --num-prompts 256)
  llama    1000 x 1024 in / 128 out; total tok/s
  batch1   one request at a time, 512 in / 128 out; s per request and the decode step time
  penalty  256 x 512 in / 256 out: decode tok/s of the batch without, then with one
           repetition_penalty request among them, then without again
  structured  64 x 512 in / up to 256 out: output tok/s free, every request constrained to
           a customer-service ticket JSON schema, and half of them constrained (the free
           half's tok/s reported separately)
Each prints RESULT lines; every arm runs once untimed first (Triton compiles, allocator).
"""

from __future__ import annotations

import random
import sys
import time

from pagedllm import LLM, SamplingParams
from pagedllm.bench.schemas import TICKET_SCHEMA


def main() -> None:
    work, model = sys.argv[1], sys.argv[2]
    kw: dict[str, object] = {}
    for arg in sys.argv[3:]:
        key, value = arg.split("=", 1)
        kw[key] = int(value) if value.lstrip("-").isdigit() else value
    llm = LLM(model, load_format="dummy", **kw)
    vocab = llm.llm_engine.runner.vocab_size
    rng = random.Random(0)
    tag = f"{work} {kw or 'defaults'}"

    def ids(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    def gen(prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> tuple:
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return outs, time.perf_counter() - start

    def sp(max_tokens: int, **extra: object) -> SamplingParams:
        return SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, **extra)

    if work == "qwen":
        reqs = [(ids(rng.randint(101, 1023)), rng.randint(101, 1023)) for _ in range(256)]
        prompts, params = [p for p, _ in reqs], [sp(o) for _, o in reqs]
        gen(prompts[:32], params[:32])
        for _ in range(2):
            outs, dt = gen(prompts, params)
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            print(f"RESULT {tag}: {n / dt:,.0f} output tok/s ({dt:.2f} s)", flush=True)
    elif work == "llama":
        prompts = [ids(1024) for _ in range(1000)]
        gen(prompts[:64], sp(128))
        _, dt = gen(prompts, sp(128))
        print(f"RESULT {tag}: {1000 * 1152 / dt:,.0f} total tok/s ({dt:.2f} s)", flush=True)
    elif work == "batch1":
        for _ in range(2):
            gen([ids(512)], sp(128))
        times = [gen([ids(512)], sp(128))[1] for _ in range(5)]
        prefill = gen([ids(512)], sp(1))[1]
        avg = sum(times) / len(times)
        step_ms = (avg - prefill) / 127 * 1e3
        print(f"RESULT {tag}: {avg:.4f} s/request, decode step {step_ms:.2f} ms", flush=True)
    elif work == "penalty":
        prompts = [ids(512) for _ in range(256)]
        plain, penalized = sp(256), sp(256, repetition_penalty=1.2)
        gen(prompts[:32], plain)
        for label, params in (
            ("no penalty", [plain] * 256),
            ("one penalty request", [penalized] + [plain] * 255),
            ("no penalty", [plain] * 256),
        ):
            _, dt = gen(prompts, params)
            print(f"RESULT {tag} {label}: {256 * 256 / dt:,.0f} output tok/s ({dt:.2f} s)")
    elif work == "structured":
        prompts = [ids(512) for _ in range(64)]
        free = sp(256)
        ticket = sp(256, structured_outputs={"json": TICKET_SCHEMA})
        gen(prompts[:8], [ticket] * 8)
        for label, params in (
            ("free", [free] * 64),
            ("constrained", [ticket] * 64),
            ("half constrained", [free, ticket] * 32),
        ):
            outs, dt = gen(prompts, params)
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            pairs = zip(outs, params, strict=True)
            n_free = sum(len(o.outputs[0].token_ids) for o, p in pairs if p is free)
            print(
                f"RESULT {tag} {label}: {n / dt:,.0f} output tok/s ({dt:.2f} s, {n} tokens; "
                f"free requests {n_free / dt:,.0f} tok/s)",
                flush=True,
            )
    else:
        raise SystemExit(f"unknown workload {work!r}; see the module doc")


if __name__ == "__main__":
    main()
