"""Weight-only GEMV for a few rows (decode): CUDA-core FMAs, no tensor cores.

With 1-8 rows the product is a read of the packed weights (``K * N * bits / 8`` bytes), and
what bounds the kernel after the bytes is the work per weight value: at 4.8 TB/s an H200
delivers ~10^13 int4 values a second, about what its CUDA cores issue at four instructions
each. So the inner loop is built to spend few instructions per value:

* each packed word is loaded once (``[BLOCK_K / pf, BLOCK_N]`` words, N contiguous: 16-byte
  loads, whole cache lines) and its ``pf`` values are taken with a shift and a mask;
* the integer becomes a float without a conversion instruction (conversions issue at a
  fraction of the FMA rate): OR-ing it into the mantissa of 2^23 (``0x4B000000``) gives the
  fp32 ``2^23 + q`` exactly, and one subtraction of ``2^23 + zero`` leaves ``q - zero``;
* the scale is applied once per word row and group, not per value: a K block lies inside one
  group (the launcher picks ``BLOCK_K`` that way), so ``sum_k x_k s (q_k - z) = s * sum_k
  x_k (q_k - z)``;
* the sum over K stays in each thread's registers (a ``[BLOCK_M, BLOCK_K / pf, BLOCK_N]``
  accumulator); the one cross-thread reduction happens after the loop.

With ``HALF`` (fp16 activations only) the values are made and multiplied in fp16 instead
(``0x6400`` is fp16 1024, and ``1024 + q`` is exact) and only each word's sum of ``pf``
products is widened to fp32. K is split over programs; ``int4_splitk.py`` adds the slices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels.int4_splitk import REDUCE_MODES, reduce_partials, split_k_buffers
from pagedllm.kernels.int4_splitk import split_k_epilogue as _epilogue


@triton.jit(do_not_specialize=["m"])
def _gemv_kernel(
    x_ptr, q_ptr, z_ptr, s_ptr, b_ptr, out_ptr, part_ptr, lock_ptr,
    m, n, kw_total, kw_per_split, group_words, stride_xm, stride_om,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):  # fmt: skip
    PF: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    split_k = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    r = tl.arange(0, BLOCK_KW)
    kw_start = pid_k * kw_per_split
    kw_end = tl.minimum(kw_start + kw_per_split, kw_total)
    acc = tl.zeros([BLOCK_M, BLOCK_KW, BLOCK_N], tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None, None] * stride_xm
    for kw0 in range(kw_start, kw_end, BLOCK_KW):
        kw = kw0 + r
        kw_ok = kw < kw_end
        words = tl.load(
            q_ptr + kw.to(tl.int64)[:, None] * n + cols[None, :],
            mask=kw_ok[:, None] & col_ok[None, :],
            other=0,
        )
        g = kw0 // group_words
        z = tl.load(z_ptr + g * n + cols, mask=col_ok, other=0).to(tl.int32)
        s = tl.load(s_ptr + g * n + cols, mask=col_ok, other=0.0).to(tl.float32)
        x_mask = row_ok[:, None, None] & kw_ok[None, :, None]
        if HALF:
            zh = (z | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)[None, :]
            part = tl.zeros([BLOCK_M, BLOCK_KW, BLOCK_N], tl.float16)
        else:
            zf = (z | 0x4B000000).to(tl.float32, bitcast=True)[None, :]
            part = tl.zeros([BLOCK_M, BLOCK_KW, BLOCK_N], tl.float32)
        for i in tl.static_range(PF):
            q = (words >> (i * BITS)) & MASK
            xi = tl.load(x_rows + (kw * PF + i)[None, :, None], mask=x_mask, other=0.0)
            if HALF:
                w = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - zh
                part += xi * w[None, :, :]
            else:
                w = (q | 0x4B000000).to(tl.float32, bitcast=True) - zf
                part += xi.to(tl.float32) * w[None, :, :]
        acc += part.to(tl.float32) * s[None, None, :]
    y = tl.sum(acc, axis=1)
    _epilogue(
        y, rows, cols, m, n, pid_k, pid_m * tl.num_programs(0) + pid_n, split_k,
        b_ptr, out_ptr, part_ptr, lock_ptr, stride_om,
        HAS_BIAS=HAS_BIAS, REDUCE=REDUCE,
    )  # fmt: skip


def gemv_block_k(block_k: int, group: int, k: int, pf: int) -> int:
    """The largest power of two <= ``block_k`` that divides ``group`` (each K block then lies
    in one group), at least ``pf``; 0 when none does (the GEMV cannot serve that group)."""
    if group == k:
        return block_k
    fit = block_k
    while fit >= pf and group % fit:
        fit //= 2
    return fit if fit >= pf else 0


def int_weight_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group: int,
    bias: torch.Tensor | None,
    cfg: dict,
) -> torch.Tensor:
    """``x`` [M, K] contiguous (already permuted) times the packed weight; ``group`` is the
    real group size (K for one group). ``cfg``: BLOCK_M / BLOCK_N / BLOCK_K (values) /
    SPLIT_K / REDUCE / HALF / num_warps / num_stages."""
    m, k = x.shape
    n = packed.shape[1]
    pf = 32 // bits
    block_k = gemv_block_k(cfg["BLOCK_K"], group, k, pf)
    if not block_k:
        raise ValueError(f"GEMV: no power-of-two K block >= {pf} divides group size {group}")
    block_kw = block_k // pf
    kw_total = k // pf
    k_blocks = triton.cdiv(kw_total, block_kw)
    blocks_per_split = triton.cdiv(k_blocks, min(cfg["SPLIT_K"], k_blocks))
    kw_per_split = blocks_per_split * block_kw
    split_k = triton.cdiv(kw_total, kw_per_split)
    reduce = cfg.get("REDUCE", "serial") if split_k > 1 else "none"
    half = bool(cfg.get("HALF", False)) and x.dtype == torch.float16
    out, part, locks = split_k_buffers(reduce, split_k, m, n, x.dtype, x.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split_k, triton.cdiv(m, cfg["BLOCK_M"]))
    _gemv_kernel[grid](
        x, packed, zeros, scales, bias if bias is not None else scales, out, part, locks,
        m, n, kw_total, kw_per_split, (k if group == k else group) // pf, x.stride(0),
        out.stride(0),
        BITS=bits, HAS_BIAS=bias is not None, REDUCE=REDUCE_MODES[reduce], HALF=half,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_KW=block_kw,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )  # fmt: skip
    if reduce == "twopass":
        reduce_partials(part, bias, out)
    return out
