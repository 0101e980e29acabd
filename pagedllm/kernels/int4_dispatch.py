"""Which weight-only kernel and tiles serve an ``[M, K] x [K, N]`` product (``int4_gemm.py``).

``MEASURED`` holds, per weight shape ``(N, K)`` and M bucket, the fastest configuration that
``benchmarks/int4_sweep.py`` found on an H200 (it names its run); shapes it did not measure
get :func:`heuristic_config`: the GEMV for a few rows with K split until the grid holds a few
programs per SM (opt-in until checked on a GPU: ``GEMV_ENABLED``), tensor-core tiles
above. Both are plain tables, so dispatch costs a dict
lookup on the host (the decode graphs capture one configuration per batch size anyway).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

DEQUANT: dict[str, Any] = {"KERNEL": "dequant"}


def _dot(  # type: ignore[no-untyped-def]
    bm, bn, bk, split, swap, warps=4, stages=3, reduce="serial"
) -> dict[str, Any]:
    return {
        "KERNEL": "dot", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
        "REDUCE": reduce, "SWAP_AB": swap, "num_warps": warps, "num_stages": stages,
    }  # fmt: skip


# (N, K) -> [(largest M, config)], ascending M; None: heuristic_config. From
# benchmarks/int4_sweep.py on an H200 (fp16, Qwen2.5-14B's shapes, group 128), run of
# 2026-11-30 07:03 UTC at commit 6e57bc2 (docs/benchmarks.md, fourth run):
# only its M >= 16 winners (tensor-core tiles, dequantize + cuBLAS; those kernels have not
# changed since). The GEMV was rewritten after that run, so M <= 8 stays heuristic until a
# sweep of it: `python benchmarks/int4_sweep.py --emit-table OUT.json` prints this table.
# (qkv at M=64: the two-pass reduction, 4% slower than the atomic one, whose order varies.)
MEASURED: dict[tuple[int, int], list[tuple[int, dict[str, Any] | None]]] = {
    (5120, 5120): [
        (8, None),
        (16, _dot(16, 128, 128, 8, True)),
        (32, _dot(32, 128, 128, 8, True)),
        (64, _dot(64, 64, 128, 4, True)),
        (128, DEQUANT),
        (256, DEQUANT),
    ],
    (5120, 13824): [
        (8, None),
        (16, _dot(16, 128, 128, 8, True)),
        (32, _dot(32, 128, 128, 8, True)),
        (64, _dot(64, 64, 128, 4, True)),
        (128, DEQUANT),
        (256, DEQUANT),
    ],
    (7168, 5120): [
        (8, None),
        (16, _dot(16, 128, 128, 8, True)),
        (32, _dot(32, 64, 128, 4, True)),
        (64, _dot(64, 128, 64, 4, False, reduce="twopass")),
        (128, DEQUANT),
        (256, DEQUANT),
    ],
    (27648, 5120): [
        (8, None),
        (16, _dot(16, 128, 128, 2, True)),
        (32, _dot(32, 128, 128, 1, True)),
        (64, _dot(64, 128, 128, 1, True)),
        (128, _dot(128, 128, 64, 1, False, warps=8)),
        (256, DEQUANT),
    ],
}

GEMV_MAX_ROWS = 8
# The GEMV for a few rows was rewritten after the last GPU run and has not been checked on a
# GPU yet (its predecessor passed Triton's CPU interpreter and still gave wrong sums for four
# rows per program on an H200). Until a GPU run of tests/kernels/test_int4_gemm.py passes,
# few rows take the tensor-core kernel, which every configuration of that run got right;
# PAGEDLLM_INT4_GEMV=1 opts into the GEMV (for that run and the sweep).
GEMV_ENABLED = os.environ.get("PAGEDLLM_INT4_GEMV") == "1"


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (8 off CUDA, where only tests launch)."""
    if device.type != "cuda":
        return 8
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def split_for(programs: int, k_blocks: int, target: int) -> int:
    """A K split that brings ``programs`` output tiles near ``target`` programs in all, with
    at least two K blocks per slice."""
    split = 1
    while programs * split * 2 <= target and k_blocks // (split * 2) >= 2:
        split *= 2
    return split


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def heuristic_config(m: int, n: int, k: int, bits: int, device: torch.device) -> dict[str, Any]:
    """The configuration for a shape the sweep did not measure (module doc)."""
    sms = num_sms(device)
    if m <= GEMV_MAX_ROWS and GEMV_ENABLED:  # tiles of 16-32 words per thread (int4_gemv.py)
        block_m = 1 if m == 1 else 2 if m == 2 else 4
        block_n, block_k, warps = {1: (512, 32, 2), 2: (256, 64, 4), 4: (256, 32, 4)}[block_m]
        tiles = _cdiv(m, block_m) * _cdiv(n, block_n)
        split = split_for(tiles, _cdiv(k, block_k), 4 * sms)
        return {
            "KERNEL": "gemv", "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
            "SPLIT_K": split, "REDUCE": "serial", "PREFETCH": True, "num_warps": warps,
            "num_stages": 1,
        }  # fmt: skip
    if m <= 64:
        block_m, block_n, block_k = (16 if m <= 16 else 32 if m <= 32 else 64), 64, 64
    else:
        block_m, block_n, block_k = 128, 128, 64
    tiles = _cdiv(m, block_m) * _cdiv(n, block_n)
    split = split_for(tiles, _cdiv(k, block_k), 2 * sms) if m <= 64 else 1
    return {
        "KERNEL": "dot", "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
        "SPLIT_K": split, "REDUCE": "serial", "num_warps": 4, "num_stages": 3,
    }  # fmt: skip


def pick_config(
    m: int, n: int, k: int, group_size: int, bits: int, device: torch.device
) -> dict[str, Any]:
    """The measured configuration of the first M bucket holding ``m`` (the last bucket for
    larger M), else (no bucket, or a None one) :func:`heuristic_config`. ``group_size``
    only constrains the K block, which the launchers fit to it."""
    buckets = MEASURED.get((n, k)) if bits == 4 else None
    if buckets:
        cfg = next((c for max_m, c in buckets if m <= max_m), buckets[-1][1])
        if cfg is not None:
            return cfg
    return heuristic_config(m, n, k, bits, device)
