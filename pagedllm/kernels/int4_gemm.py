"""Weight-only int4 / int8 GEMM (Triton): ``out = x[:, perm] @ dequant(W) (+ bias)``.

Reads the layout of ``layers/quantization/weight_only.py``: ``packed`` int32 ``[K / pf, N]``
(``pf = 32 / bits`` values per word along K, lowest bits first), ``zeros`` uint8 ``[G, N]``,
``scales`` ``[G, N]``, row ``k`` in group ``k // group_size`` (act-order checkpoints arrive
with their rows sorted by group and ``perm`` the matching input-column order).

Each program owns a ``BLOCK_M x BLOCK_N`` output tile and one of ``SPLIT_K`` slices of K. It
loads ``BLOCK_K / pf`` packed rows per step, expands them in registers (shift and mask),
subtracts the zero points, multiplies by the scales (in fp32, then to the activation dtype)
and feeds the tensor cores with ``tl.dot``. When a K block lies inside one group (the group
size a multiple of ``BLOCK_K``, or a single group) it loads one row of scales and zeros per
block instead of one per element.

Decode steps have few rows: there the GEMM is a read of the packed weights, which takes
``K * N * bits / 8`` bytes, and ``N / BLOCK_N`` tiles alone do not occupy every SM, so K is
split (``SPLIT_K`` > 1) and the fp32 partial sums are added afterwards. Larger batches use
bigger M tiles and no split. The configurations are heuristics for now; measuring them at
start-up like the skinny GEMM's dispatch (``worker/linear_tuning.py``) is the next step.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["m"])
def _int_weight_kernel(
    x_ptr, q_ptr, z_ptr, s_ptr, b_ptr, out_ptr,
    m, n, k, k_per_split, group_size,
    stride_xm, stride_om, stride_os,
    BITS: tl.constexpr, ONE_GROUP_PER_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    PF: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_end
        a = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wmask = k_ok[:, None] & col_ok[None, :]
        words = tl.load(
            q_ptr + (kk // PF).to(tl.int64)[:, None] * n + cols[None, :], mask=wmask, other=0
        )
        q = (words >> ((kk % PF) * BITS)[:, None]) & MASK
        if ONE_GROUP_PER_BLOCK:
            g = k0 // group_size
            z = tl.load(z_ptr + g * n + cols, mask=col_ok, other=0).to(tl.int32)[None, :]
            s = tl.load(s_ptr + g * n + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        else:
            g = (kk // group_size).to(tl.int64)[:, None] * n + cols[None, :]
            z = tl.load(z_ptr + g, mask=wmask, other=0).to(tl.int32)
            s = tl.load(s_ptr + g, mask=wmask, other=0.0).to(tl.float32)
        w = ((q - z).to(tl.float32) * s).to(a.dtype)
        acc += tl.dot(a, w)
    out_ptrs = out_ptr + pid_k * stride_os + rows[:, None] * stride_om + cols[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(out_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def pick_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> dict[str, int]:
    """Tile sizes and K split for an ``[m, k] x [k, n]`` product (heuristic, see module doc)."""
    if m <= 16:
        block_m, block_n, block_k = 16, 64, 128
    elif m <= 64:
        block_m, block_n, block_k = 64, 64, 64
    else:
        block_m, block_n, block_k = 128, 128, 64
    if group_size > 0 and group_size % block_k:
        # One group per block (one row of scales per block) where a power of two >= 16 allows.
        fit = block_k
        while fit >= 16 and group_size % fit:
            fit //= 2
        if fit >= 16:
            block_k = fit
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    split_k = 1
    if m <= 64:  # too few tiles to fill the GPU: split K until ~2 waves of programs
        want = 2 * _num_sms(device)
        while tiles * split_k * 2 <= want and k_blocks // (split_k * 2) >= 4:
            split_k *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k}


def int_weight_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    perm: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """``x`` [M, K] (fp16 / bf16) times the weight in the layout of the module doc -> [M, N]."""
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
    cfg = dict(config or pick_config(m, n, k, group_size, x.device))
    split_k, block_k = cfg["SPLIT_K"], cfg["BLOCK_K"]
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    if split_k == 1:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    _int_weight_kernel[grid](
        x, packed, zeros, scales, bias if bias is not None else scales, out,
        m, n, k, k_per_split, group,
        x.stride(0), out.stride(-2), out.stride(0) if split_k > 1 else 0,
        BITS=bits, ONE_GROUP_PER_BLOCK=(group == k or group % block_k == 0),
        HAS_BIAS=bias is not None, SPLIT_K=split_k,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        num_warps=4, num_stages=3,
    )  # fmt: skip
    if split_k == 1:
        return out
    y = out.sum(dim=0)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
