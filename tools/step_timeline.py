"""Where an offline run's time goes, step by step: GPU busy vs idle per batch-size bucket.

python tools/step_timeline.py MODEL_DIR [--num-prompts 256] [--len-range 101:1023]

Runs random requests (prompt and output lengths uniform in the range, ignore_eos,
temperature 1.0) through ``LLMEngine.step`` and records, for every step, its wall time and
two CUDA events around the runner's enqueue. GPU time of a step = end event - start event;
GPU idle before a step = its start event - the previous step's end event (the device waited
for the host). Prints a table per bucket (prefill-carrying steps, decode steps by batch
size): steps, wall ms/step, GPU ms/step, idle ms/step. Idle time is what host-side work
costs; GPU time is what kernels cost.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from pagedllm import LLM, SamplingParams

BUCKETS = [(1, 8), (9, 32), (33, 64), (65, 128), (129, 256), (257, 1024)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--len-range", default="101:1023")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--no-async", action="store_true")
    ap.add_argument("--no-gumbel", action="store_true", help="general sampler path (A/B)")
    args = ap.parse_args()
    if args.no_gumbel:
        import pagedllm.sample.sampler as sampler_mod

        sampler_mod._gumbel_ok = lambda *a: False  # type: ignore[assignment]
    lo, hi = (int(x) for x in args.len_range.split(":"))
    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        load_format="dummy",
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        async_scheduling=not args.no_async,
    )
    print(f"init {time.perf_counter() - t0:.1f} s")
    eng = llm.llm_engine
    runner = eng.runner
    vocab = eng.config.model_config.arch.vocab_size
    g = torch.Generator().manual_seed(0)
    events: list[tuple[torch.cuda.Event, torch.cuda.Event, int, int]] = []
    orig = runner.execute_async

    def timed(sched):  # type: ignore[no-untyped-def]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        handle = orig(sched)
        end.record()
        tokens = sum(s.end - s.start for s in sched.scheduled)
        events.append((start, end, len(sched.scheduled), tokens))
        return handle

    for warm in (True, False):
        n = 4 if warm else args.num_prompts
        for _ in range(n):
            plen = int(torch.randint(lo, hi + 1, (1,), generator=g))
            olen = int(torch.randint(lo, hi + 1, (1,), generator=g))
            ids = torch.randint(100, vocab - 100, (plen,), generator=g).tolist()
            params = SamplingParams(temperature=1.0, max_tokens=olen, ignore_eos=True, seed=None)
            eng.add_request(None, ids, params)
        if not warm:
            runner.execute_async = timed  # type: ignore[method-assign]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out_tokens = 0
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    out_tokens += len(o.outputs[0].token_ids)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    runner.execute_async = orig  # type: ignore[method-assign]
    print(f"elapsed {elapsed:.2f} s, {out_tokens / elapsed:.0f} out tok/s, {len(events)} steps")
    agg: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    prev_end = None
    prefill_ms: list[float] = []
    total_busy = total_idle = 0.0
    for start, end, nseq, ntok in events:
        busy = start.elapsed_time(end)
        idle = prev_end.elapsed_time(start) if prev_end is not None else 0.0
        prev_end = end
        total_busy += busy
        total_idle += idle
        if ntok > nseq:
            key = "prefill"
            prefill_ms.append(round(busy, 1))
        else:
            key = next(f"decode {a}-{b}" for a, b in BUCKETS if a <= nseq <= b)
        a = agg[key]
        a[0] += 1
        a[1] += busy
        a[2] += idle
    print(f"GPU busy {total_busy / 1e3:.2f} s, GPU idle between steps {total_idle / 1e3:.2f} s")
    print(f"{'bucket':>16} {'steps':>6} {'gpu ms/step':>12} {'idle ms/step':>13} {'total s':>8}")
    rows = {}
    for key in sorted(agg):
        n, busy, idle = agg[key]
        rows[key] = {"steps": n, "gpu_ms": busy / n, "idle_ms": idle / n}
        print(f"{key:>16} {n:>6} {busy / n:>12.2f} {idle / n:>13.2f} {(busy + idle) / 1e3:>8.2f}")
    print("prefill-carrying steps, GPU ms each:", prefill_ms)
    print(json.dumps({"elapsed_s": elapsed, "out_tok_s": out_tokens / elapsed, "buckets": rows}))


if __name__ == "__main__":
    main()
