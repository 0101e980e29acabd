"""Weight-only GEMV for a few rows (decode): CUDA-core FMAs, no tensor cores.

With 1-4 rows per program the product is a read of the packed weights (``K * N * bits / 8``
bytes), and what bounds the kernel after the bytes is the work per weight value: at 4.8 TB/s
an H200 delivers ~10^13 int4 values a second, about what its CUDA cores issue at three
instructions each. So the inner loop is built to spend about three per value (checked in
the SASS: one LOP3, one FADD, one FFMA):

* each packed word is loaded once (``[BLOCK_K / pf, BLOCK_N]`` words, N contiguous: 16-byte
  loads, whole cache lines);
* a value becomes a float without shift or conversion: masking it in place and OR-ing in the
  exponent of 2^23 (``0x4B000000``, passed as an argument so that the AND and the OR fuse into
  one LOP3) gives the fp32 ``2^23 + q * 2^p`` exactly, where ``p`` is the value's bit
  position (values too high for the 23-bit mantissa come from the word shifted once); one
  subtraction of ``2^23 + z * 2^p`` leaves ``(q - z) * 2^p``, and the activation, scaled by
  ``2^-p`` (exact in fp32), undoes the position;
* the scale is applied once per word and group, not per value: a K block lies inside one
  group (the launcher picks ``BLOCK_K`` that way), so ``sum_k x_k s (q_k - z) = s * sum_k
  x_k (q_k - z)``;
* the sum over K stays in each thread's registers (a ``[BLOCK_K / pf, BLOCK_N]`` accumulator
  per row, all 2-D in the words' layout: 3-D tensors made Triton move every partial product
  through shared memory); the one cross-thread reduction happens after the loop;
* Triton does not pipeline loads that feed no ``tl.dot``, so with ``PREFETCH`` the next
  block's words are loaded before the current block is used (twice the bytes in flight).

K is split over programs; ``int4_splitk.py`` adds the slices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels.int4_splitk import REDUCE_MODES, reduce_partials, split_k_buffers
from pagedllm.kernels.int4_splitk import split_k_epilogue as _epilogue

MAGIC = 0x4B000000  # fp32 2^23: OR-ed into a mantissa, an integer below 2^23 becomes 2^23 + q


@triton.jit
def _value(words, hi, z, magic, i: tl.constexpr, BITS: tl.constexpr):
    """``(q_i - z) * 2^p`` in fp32 for value ``i`` of every word (``p``: its bit position in
    ``words`` or ``hi``)."""
    LOW: tl.constexpr = 23 // BITS  # values whose field ends below bit 23 are read in place
    HI_SHIFT: tl.constexpr = BITS * ((9 + BITS - 1) // BITS)  # the rest from words >> this
    P: tl.constexpr = i * BITS if i < LOW else i * BITS - HI_SHIFT
    src = words if i < LOW else hi
    q = (src & (((1 << BITS) - 1) << P)) | magic
    zf = ((z << P) | magic).to(tl.float32, bitcast=True)
    return q.to(tl.float32, bitcast=True) - zf[None, :]


@triton.jit
def _x(x_row, kw, ok, i: tl.constexpr, BITS: tl.constexpr):
    """The activations that meet value ``i`` of each word row, scaled by ``2^-p``."""
    PF: tl.constexpr = 32 // BITS
    LOW: tl.constexpr = 23 // BITS
    HI_SHIFT: tl.constexpr = BITS * ((9 + BITS - 1) // BITS)
    SCALE: tl.constexpr = 1.0 / (1 << (i * BITS if i < LOW else i * BITS - HI_SHIFT))
    return (tl.load(x_row + kw * PF + i, mask=ok, other=0.0).to(tl.float32) * SCALE)[:, None]


@triton.jit
def _load_words(q_ptr, kw0, kw_end, cols, col_ok, n, BLOCK_KW: tl.constexpr):
    kw = kw0 + tl.arange(0, BLOCK_KW)
    return tl.load(
        q_ptr + kw.to(tl.int64)[:, None] * n + cols[None, :],
        mask=(kw < kw_end)[:, None] & col_ok[None, :],
        other=0,
    )


@triton.jit(do_not_specialize=["m"])
def _gemv_kernel(
    x_ptr, q_ptr, z_ptr, s_ptr, b_ptr, out_ptr, part_ptr, lock_ptr,
    m, n, kw_total, kw_per_split, group_words, stride_xm, stride_om, magic,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):  # fmt: skip
    PF: tl.constexpr = 32 // BITS
    HI_SHIFT: tl.constexpr = BITS * ((9 + BITS - 1) // BITS)
    pid_m = tl.program_id(0)  # rows fastest: the row tiles of a weight tile run together
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    row0 = pid_m * BLOCK_M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    kw_start = pid_k * kw_per_split
    kw_end = tl.minimum(kw_start + kw_per_split, kw_total)
    x0 = x_ptr + row0.to(tl.int64) * stride_xm
    acc0 = tl.zeros([BLOCK_KW, BLOCK_N], tl.float32)
    acc1 = tl.zeros([BLOCK_KW, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_KW, BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_KW, BLOCK_N], tl.float32)
    if PREFETCH:
        words = _load_words(q_ptr, kw_start, kw_end, cols, col_ok, n, BLOCK_KW)
    for kw0 in range(kw_start, kw_end, BLOCK_KW):
        if PREFETCH:
            cur = words
            words = _load_words(q_ptr, kw0 + BLOCK_KW, kw_end, cols, col_ok, n, BLOCK_KW)
        else:
            cur = _load_words(q_ptr, kw0, kw_end, cols, col_ok, n, BLOCK_KW)
        kw = kw0 + tl.arange(0, BLOCK_KW)
        kw_ok = kw < kw_end
        hi = cur >> HI_SHIFT
        g = kw0 // group_words
        z = tl.load(z_ptr + g * n + cols, mask=col_ok, other=0).to(tl.int32)
        s = tl.load(s_ptr + g * n + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        p0 = tl.zeros([BLOCK_KW, BLOCK_N], tl.float32)
        p1 = tl.zeros([BLOCK_KW, BLOCK_N], tl.float32)
        p2 = tl.zeros([BLOCK_KW, BLOCK_N], tl.float32)
        p3 = tl.zeros([BLOCK_KW, BLOCK_N], tl.float32)
        for i in tl.static_range(PF):
            w = _value(cur, hi, z, magic, i, BITS)
            p0 += _x(x0, kw, kw_ok, i, BITS) * w
            if BLOCK_M > 1:
                p1 += _x(x0 + stride_xm, kw, kw_ok & (row0 + 1 < m), i, BITS) * w
            if BLOCK_M > 2:
                p2 += _x(x0 + 2 * stride_xm, kw, kw_ok & (row0 + 2 < m), i, BITS) * w
                p3 += _x(x0 + 3 * stride_xm, kw, kw_ok & (row0 + 3 < m), i, BITS) * w
        acc0 += p0 * s
        if BLOCK_M > 1:
            acc1 += p1 * s
        if BLOCK_M > 2:
            acc2 += p2 * s
            acc3 += p3 * s
    # One [BLOCK_M, BLOCK_N] tile for the epilogue (one tile counter for all its rows), put
    # together by broadcasting (no join / reshape / transpose to get wrong).
    r = tl.arange(0, BLOCK_M)[:, None]
    y = tl.where(r == 0, tl.sum(acc0, axis=0)[None, :], 0.0)
    if BLOCK_M > 1:
        y = tl.where(r == 1, tl.sum(acc1, axis=0)[None, :], y)
    if BLOCK_M > 2:
        y = tl.where(r == 2, tl.sum(acc2, axis=0)[None, :], y)
        y = tl.where(r == 3, tl.sum(acc3, axis=0)[None, :], y)
    rows = row0 + tl.arange(0, BLOCK_M)
    _epilogue(
        y, rows, cols, m, n, pid_k, pid_m * tl.num_programs(1) + pid_n, tl.num_programs(2),
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
    real group size (K for one group). ``cfg``: BLOCK_M (1, 2 or 4) / BLOCK_N / BLOCK_K
    (values) / SPLIT_K / REDUCE / PREFETCH / num_warps / num_stages."""
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
    if cfg["BLOCK_M"] not in (1, 2, 4):
        raise ValueError(f"GEMV BLOCK_M is 1, 2 or 4, not {cfg['BLOCK_M']}")
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    reduce, out, part, locks = split_k_buffers(
        cfg.get("REDUCE", "serial"), split_k, grid[0] * grid[1], m, n, x.dtype, x.device
    )
    _gemv_kernel[grid](
        x, packed, zeros, scales, bias if bias is not None else scales, out, part, locks,
        m, n, kw_total, kw_per_split, (k if group == k else group) // pf, x.stride(0),
        out.stride(0), MAGIC,
        BITS=bits, HAS_BIAS=bias is not None, REDUCE=REDUCE_MODES[reduce],
        PREFETCH=bool(cfg.get("PREFETCH", False)),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_KW=block_kw,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )  # fmt: skip
    if reduce == "twopass":
        reduce_partials(part, bias, out)
    return out
