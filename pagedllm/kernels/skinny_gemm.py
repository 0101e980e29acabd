"""Skinny GEMM (Triton) for decode steps with a handful of rows: ``out = x @ w.T (+ bias)``.

With M <= 16 rows the product is a weight read: its floor is ``N * K * 2`` bytes at the
memory bandwidth. cuBLAS's heuristics sometimes launch fewer CTAs than the GPU has SMs for
such shapes (Llama-3-8B's 4096x4096 o_proj at M = 1 ran at 54% of bandwidth on an H100).
Here every program owns ``BLOCK_N`` output columns for all rows (padded to 16 for
``tl.dot``) and streams its weight rows over K, so N / 16 programs cover the GPU. Whether
it beats cuBLAS is measured per shape at start-up (``worker/linear_tuning.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16
BLOCK_N = 16
BLOCK_K = 256


@triton.jit(do_not_specialize=["m"])
def _skinny_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, m, n, k, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    col_ok = cols < n
    row_ok = rows < m
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + kk[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(w_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` [M <= 16, K] (bf16/fp16, unit stride in K) times ``weight`` [N, K]."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(n, BLOCK_N),)](
        x, weight, bias if bias is not None else weight, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=4, num_stages=4,
    )  # fmt: skip
    return out
