"""Per-token fp8 activation quantization in one Triton kernel (CUDA only).

``fp8_utils.quantize_rows`` in torch is four or five kernels (abs, amax, divide, clamp, cast)
per linear layer, each a launch and a pass over the activations: at decode, with seven fp8
linears per transformer layer, those launches cost more than the GEMMs they feed. Here one
program per token row reads the row, takes its absmax, writes the scale (absmax times the
float32 1/448, at least ``MIN_SCALE``) and the rounded e4m3 values, with the same operations as
the torch version (round-to-nearest division, saturation to +-448, round-to-nearest-even cast),
so both give the same bits. Rows up to ``ONE_PASS_MAX`` elements stay in registers; longer
ones are read twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.layers.quantization.fp8_utils import FP8_DTYPE, FP8_MAX, MIN_SCALE

ONE_PASS_MAX = 8192
TWO_PASS_BLOCK = 4096


@triton.jit
def _per_token_quant_kernel(
    x_ptr, q_ptr, s_ptr, k, stride_x,
    FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * k
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = offs < k
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.maximum(amax * (1.0 / FP8_MAX), MIN_SCALE)
        q = tl.math.div_rn(x, tl.zeros([BLOCK_K], tl.float32) + scale)
        q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
        tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, k, BLOCK_K):
            mask = k0 + offs < k
            x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(x))
        amax = tl.max(acc, axis=0)
        scale = tl.maximum(amax * (1.0 / FP8_MAX), MIN_SCALE)
        for k0 in range(0, k, BLOCK_K):
            mask = k0 + offs < k
            x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            q = tl.math.div_rn(x, tl.zeros([BLOCK_K], tl.float32) + scale)
            q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
            tl.store(q_row + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq [M, K] e4m3 contiguous, scale [M] float32)`` of CUDA rows ``x`` [M, K]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    one_pass = k <= ONE_PASS_MAX
    block = triton.next_power_of_2(k) if one_pass else TWO_PASS_BLOCK
    warps = 4 if block <= 2048 else 8
    _per_token_quant_kernel[(m,)](
        x, q, scale, k, x.stride(0),
        FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE, BLOCK_K=block, ONE_PASS=one_pass, num_warps=warps,
    )  # fmt: skip
    return q, scale
