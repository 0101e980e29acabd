"""Decode paged-attention sweep: tile, warps, stages and KV splits against the KV-read roofline.

python benchmarks/attn_sweep.py [--quick]

For Qwen3-0.6B-like (16 q / 8 kv heads) and Llama-3-8B-like (32 / 8) heads, D = 128, bf16,
block size 16, shuffled block tables: times the decode kernel (+ split merge) per
(batch, context) and config from CUDA-graph replays (no launch overhead), and prints the
achieved KV bandwidth (bytes of K and V read / time) next to the current default's.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from pagedllm.device_utils import cuda_graph_time_us
from pagedllm.kernels.paged_attention import num_sms, paged_attention
from pagedllm.layers.attention.triton_backend import decode_num_splits

SHAPES = {"qwen3-0.6b": (16, 8, 128), "llama-3-8b": (32, 8, 128)}
CASES = [(1, 640), (1, 4096), (8, 1500), (16, 1500), (32, 1500), (64, 1400), (256, 1000)]


def bench(fn, iters: int = 20) -> float:  # type: ignore[no-untyped-def]
    """GPU time per call (µs) from CUDA-graph replays."""
    return cuda_graph_time_us(fn, reps=iters, replays=5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--layout",
        choices=["NHD", "HND"],
        default="NHD",
        help="KV block layout: [block, token, head, dim] (the engine's) or [block, head, token, d]",
    )
    args = ap.parse_args()
    big = torch.empty(2**30, device="cuda", dtype=torch.bfloat16)
    read_us = bench(big.sum, iters=5)
    print(json.dumps({"read_roofline_gbs": round(2 * 2**30 / read_us / 1e3)}), flush=True)
    del big
    sms = num_sms(torch.device("cuda"))
    bs = 16
    results = []
    for name, (hq, hkv, d) in SHAPES.items():
        for b, ctx in CASES:
            nblk = -(-ctx // bs)
            if args.layout == "NHD":
                cache = torch.randn(2, b * nblk + 1, bs, hkv, d, device="cuda").bfloat16()
            else:  # same logical shape, head-major storage inside each block
                cache = torch.randn(2, b * nblk + 1, hkv, bs, d, device="cuda").bfloat16()
                cache = cache.transpose(2, 3)
            tables = torch.randperm(b * nblk, device="cuda", dtype=torch.int32).view(b, nblk)
            seq_lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
            qsl = torch.arange(b + 1, device="cuda", dtype=torch.int32)
            q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16)
            out = torch.empty_like(q)
            kv_bytes = b * ctx * hkv * d * 2 * 2
            base_split = decode_num_splits(b, hkv, ctx, sms)

            inputs = (q, cache, out, tables, seq_lens, qsl, d**-0.5)

            def run(bn: int | None, warps: int, stages: int | None, splits: int, x=inputs) -> float:  # type: ignore[no-untyped-def]
                return bench(
                    lambda: paged_attention(
                        *x,
                        decode=True,
                        num_splits=splits,
                        block_n=bn,
                        num_warps=warps,
                        num_stages=stages,
                    )  # fmt: skip
                )

            default = run(None, 4, None, base_split)  # the engine's choice
            grid = itertools.product([32, 64, 128], [4, 8], [2, 3, 4])
            if args.quick:
                grid = itertools.product([64, 128], [4, 8], [3, 4])
            best = (default, (0, 4, 0, base_split))
            for bn, w, st in grid:
                t = run(bn, w, st, base_split)
                best = min(best, (t, (bn, w, st, base_split)))
            bn, w, st, _ = best[1]
            for mult in (0.5, 2, 4):
                sp = max(1, min(32, int(base_split * mult)))
                if sp != base_split:
                    t = run(bn, w, st, sp)
                    best = min(best, (t, (bn, w, st, sp)))
            row = {
                "layout": args.layout, "model": name, "batch": b, "ctx": ctx,
                "default_us": round(default, 1),
                "default_gbs": round(kv_bytes / default / 1e3), "best_us": round(best[0], 1),
                "best_gbs": round(kv_bytes / best[0] / 1e3), "best": best[1],
            }  # fmt: skip
            results.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
