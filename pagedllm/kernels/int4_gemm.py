"""Weight-only int4 / int8 GEMM (Triton): ``out = x[:, perm] @ dequant(W) (+ bias)``.

Reads the layout of ``layers/quantization/weight_only.py``: ``packed`` int32 ``[K / pf, N]``
(``pf = 32 / bits`` values per word along K, lowest bits first), ``zeros`` uint8 ``[G, N]``,
``scales`` ``[G, N]``, row ``k`` in group ``k // group_size`` (act-order checkpoints arrive
with their rows sorted by group and ``perm`` the matching input-column order).

Three kernels serve the row counts (``config["KERNEL"]``; chosen per shape and M by
``int4_dispatch.py``):

* ``gemv`` (``int4_gemv.py``): CUDA-core FMAs for a few rows, where the weight read is all;
* ``dot``: tensor cores (``tl.dot``) on tiles dequantized in registers. Each program owns a
  ``BLOCK_M x BLOCK_N`` tile and one of ``SPLIT_K`` slices of K; it loads ``BLOCK_K / pf``
  word rows once per step and expands them with shifts, turns the integers into floats with
  the 2^23 mantissa trick (see ``int4_gemv.py``), subtracts the zero points and multiplies by
  the scales (one row of each per block when a block lies in one group). With ``SWAP_AB``
  the product is computed transposed (``W^T x^T``), so N fills the MMA's wide M side when
  the batch is small;
* ``dequant``: the whole weight dequantized by a Triton kernel, then a cuBLAS GEMM: for
  large M, where the GEMM is compute-bound and cuBLAS's tiles beat ours.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels.int4_gemv import gemv_block_k, int_weight_gemv
from pagedllm.kernels.int4_splitk import REDUCE_MODES, reduce_partials, split_k_buffers
from pagedllm.kernels.int4_splitk import split_k_epilogue as _epilogue


@triton.jit
def _dequant_tile(words, kk, cols, n, group_size, z_ptr, s_ptr, wmask,
                  BITS: tl.constexpr, ONE_GROUP_PER_BLOCK: tl.constexpr, k0,
                  BLOCK_KW: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr):  # fmt: skip
    """``[BLOCK_KW, BLOCK_N]`` words -> the ``[BLOCK_K, BLOCK_N]`` weight tile in ``DTYPE``."""
    PF: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PF) * BITS
    q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    q = tl.reshape(q, [BLOCK_KW * PF, BLOCK_N])
    col_ok = cols < n
    if ONE_GROUP_PER_BLOCK:
        g = k0 // group_size
        z = tl.load(z_ptr + g * n + cols, mask=col_ok, other=0).to(tl.int32)[None, :]
        s = tl.load(s_ptr + g * n + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        gi = (kk // group_size).to(tl.int64)[:, None] * n + cols[None, :]
        z = tl.load(z_ptr + gi, mask=wmask, other=0).to(tl.int32)
        s = tl.load(s_ptr + gi, mask=wmask, other=0.0).to(tl.float32)
    zf = (z | 0x4B000000).to(tl.float32, bitcast=True)
    w = ((q | 0x4B000000).to(tl.float32, bitcast=True) - zf) * s
    return w.to(DTYPE)


@triton.jit(do_not_specialize=["m"])
def _dot_kernel(
    x_ptr, q_ptr, z_ptr, s_ptr, b_ptr, out_ptr, part_ptr, lock_ptr,
    m, n, k, k_per_split, group_size, stride_xm, stride_om,
    BITS: tl.constexpr, ONE_GROUP_PER_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    REDUCE: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    PF: tl.constexpr = 32 // BITS
    BLOCK_KW: tl.constexpr = BLOCK_K // PF
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)
    if SWAP_AB:
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_end
        kw = k0 // PF + tl.arange(0, BLOCK_KW)
        kw_ok = kw < k_end // PF
        words = tl.load(
            q_ptr + kw.to(tl.int64)[:, None] * n + cols[None, :],
            mask=kw_ok[:, None] & col_ok[None, :],
            other=0,
        )
        a = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = _dequant_tile(
            words, kk, cols, n, group_size, z_ptr, s_ptr, k_ok[:, None] & col_ok[None, :],
            BITS, ONE_GROUP_PER_BLOCK, k0, BLOCK_KW, BLOCK_N, a.dtype,
        )  # fmt: skip
        if SWAP_AB:
            acc_t += tl.dot(tl.trans(w), tl.trans(a))
        else:
            acc += tl.dot(a, w)
    if SWAP_AB:
        acc = tl.trans(acc_t)
    _epilogue(
        acc, rows, cols, m, n, pid_k, pid_m * tl.num_programs(1) + pid_n, tl.num_programs(2),
        b_ptr, out_ptr, part_ptr, lock_ptr, stride_om,
        HAS_BIAS=HAS_BIAS, REDUCE=REDUCE,
    )  # fmt: skip


@triton.jit
def _dequant_kernel(
    q_ptr, z_ptr, s_ptr, w_ptr, kw_total, n, group_size,
    BITS: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    PF: tl.constexpr = 32 // BITS
    kw = tl.program_id(0) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (kw < kw_total)[:, None] & (cols < n)[None, :]
    words = tl.load(q_ptr + kw.to(tl.int64)[:, None] * n + cols[None, :], mask=ok, other=0)
    for i in tl.static_range(PF):
        row = kw * PF + i
        gi = (row // group_size).to(tl.int64)[:, None] * n + cols[None, :]
        z = tl.load(z_ptr + gi, mask=ok, other=0).to(tl.int32)
        s = tl.load(s_ptr + gi, mask=ok, other=0.0).to(tl.float32)
        q = ((words >> (i * BITS)) & ((1 << BITS) - 1)) | 0x4B000000
        w = (q.to(tl.float32, bitcast=True) - (z | 0x4B000000).to(tl.float32, bitcast=True)) * s
        tl.store(w_ptr + row.to(tl.int64)[:, None] * n + cols[None, :], w, mask=ok)


def dequantize_weight(
    packed: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The ``[K, N]`` weight in ``dtype`` (rows in ``perm`` order), on the GPU."""
    kw_total, n = packed.shape
    w = torch.empty((kw_total * (32 // bits), n), dtype=dtype, device=packed.device)
    grid = (triton.cdiv(kw_total, 8), triton.cdiv(n, 128))
    _dequant_kernel[grid](
        packed, zeros, scales, w, kw_total, n, group, BITS=bits, BLOCK_KW=8, BLOCK_N=128
    )
    return w


def _dot(x, packed, zeros, scales, bits, group, bias, cfg) -> torch.Tensor:  # type: ignore[no-untyped-def]
    m, k = x.shape
    n = packed.shape[1]
    pf = 32 // bits
    block_k = cfg["BLOCK_K"]
    fit = gemv_block_k(block_k, group, k, pf)
    if fit >= 16:  # one row of scales per block where a power of two >= 16 divides the group
        block_k = fit
    k_per_split = triton.cdiv(triton.cdiv(k, cfg["SPLIT_K"]), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    reduce, out, part, locks = split_k_buffers(
        cfg.get("REDUCE", "twopass"), split_k, grid[0] * grid[1], m, n, x.dtype, x.device
    )
    _dot_kernel[grid](
        x, packed, zeros, scales, bias if bias is not None else scales, out, part, locks,
        m, n, k, k_per_split, group, x.stride(0), out.stride(0),
        BITS=bits, ONE_GROUP_PER_BLOCK=(group == k or group % block_k == 0),
        HAS_BIAS=bias is not None, REDUCE=REDUCE_MODES[reduce],
        SWAP_AB=bool(cfg.get("SWAP_AB", False)),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
    )  # fmt: skip
    if reduce == "twopass":
        reduce_partials(part, bias, out)
    return out


def int_weight_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    perm: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x`` [M, K] (fp16 / bf16) times the weight in the layout of the module doc -> [M, N].

    ``config`` picks the kernel and its tiles; by default ``int4_dispatch.pick_config``."""
    if perm is not None:
        x = x[:, perm]
    x = x.contiguous()
    m, k = x.shape
    n = packed.shape[1]
    pf = 32 // bits
    assert packed.shape[0] * pf == k, (packed.shape, k)
    assert packed.is_contiguous() and zeros.is_contiguous() and scales.is_contiguous()
    group = k if group_size == -1 else group_size
    if m == 0:
        return torch.empty((0, n), dtype=x.dtype, device=x.device)
    if config is None:
        from pagedllm.kernels.int4_dispatch import pick_config

        config = pick_config(m, n, k, group_size, bits, x.device)
    kernel = config.get("KERNEL", "dot")
    if kernel == "gemv" and gemv_block_k(config["BLOCK_K"], group, k, pf):
        return int_weight_gemv(x, packed, zeros, scales, bits, group, bias, config)
    if kernel == "dequant":
        w = dequantize_weight(packed, zeros, scales, bits, group, x.dtype)
        return torch.matmul(x, w) if bias is None else torch.addmm(bias, x, w)
    if kernel == "gemv":  # a group size no K block fits: the dot kernel's per-row scales
        config = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1}
    return _dot(x, packed, zeros, scales, bits, group, bias, config)
