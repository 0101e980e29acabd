"""fp8 (e4m3) arithmetic shared by the fp8 linear method: quantize, dequantize, scaled GEMM.

A weight ``W`` [N, K] is held as ``Wq`` (float8_e4m3fn) with one float32 scale per output row,
``W ~= Wq * w_scale[:, None]``; an activation ``x`` [M, K] is quantized per token at run time
(``x ~= xq * x_scale[:, None]``), or with one static scale from the checkpoint. Then

    y = (xq @ Wq^T) * x_scale[:, None] * w_scale[None, :]

On CUDA devices with fp8 tensor cores (compute capability 8.9+: Ada, Hopper) the product runs
in ``torch._scaled_mm``: row-wise scales fused into the GEMM when the output is bfloat16 on
sm90+ (the form torch's CUTLASS kernel supports), otherwise a unit-scale fp8 GEMM into float32
followed by the two scale multiplications. Everywhere else (CPU CI, older GPUs, shapes
``_scaled_mm`` refuses) :func:`fp8_linear_reference` dequantizes both operands and multiplies
in the activation dtype: the same values, so CPU tests check the math the GPU runs.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Smallest scale: an all-zero row (padding, a zero weight row) must not divide by zero, and
# the same floor as vLLM's keeps tiny rows from overflowing when divided by their scale.
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (token, or output channel) fp8: ``(xq [M, K] e4m3, scale [M] float32)``."""
    amax = x.abs().amax(dim=-1).float()
    # Times the float32 reciprocal (not a division): the Triton kernel computes the same bits.
    scale = (amax * (1.0 / FP8_MAX)).clamp(min=MIN_SCALE)
    return quantize_with_scale(x, scale.unsqueeze(-1)), scale


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` of activation rows ``x`` [M, K]: one Triton kernel on CUDA."""
    if x.is_cuda:
        from pagedllm.layers.quantization.fp8_triton import per_token_quant_fp8

        return per_token_quant_fp8(x)
    return quantize_rows(x)


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` saturated to the e4m3 range and rounded to e4m3 (``scale`` broadcasts)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale[:, None]`` in ``dtype`` (computed in float32 first)."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def fp8_linear_reference(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y`` of the module docstring by dequantize-then-matmul in ``out_dtype`` (any device)."""
    x = dequantize_rows(xq, x_scale, out_dtype)
    w = dequantize_rows(wq, w_scale, out_dtype)
    return F.linear(x, w, bias)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.cache
def unit_scale(device: torch.device) -> torch.Tensor:
    """A float32 1 on ``device`` (the scales of a unit-scale ``_scaled_mm``). Made before any
    CUDA graph capture (``Fp8LinearMethod.process_weights_after_loading``): created during a
    capture, its fill would only run at replay."""
    return torch.ones((), dtype=torch.float32, device=device)


def scaled_mm_supported(xq: torch.Tensor, wq: torch.Tensor) -> bool:
    """Whether :func:`fp8_linear` runs ``torch._scaled_mm`` for these operands."""
    if not xq.is_cuda or _capability(xq.device.index or 0) < (8, 9):
        return False
    k, n = wq.shape[1], wq.shape[0]
    # cuBLASLt fp8 GEMMs need 16-byte aligned leading dimensions.
    return k % 16 == 0 and n % 16 == 0 and xq.shape[0] > 0


def fp8_linear(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y`` [M, N] for ``xq`` [M, K] (row-major), ``x_scale`` [M], ``wq`` [N, K] (row-major),
    ``w_scale`` [N]: ``torch._scaled_mm`` where it applies, else the reference."""
    if not scaled_mm_supported(xq, wq):
        return fp8_linear_reference(xq, x_scale, wq, w_scale, out_dtype, bias)
    xq = xq.contiguous()
    b = wq.t()  # [K, N] column-major, as _scaled_mm wants its second operand
    if out_dtype == torch.bfloat16 and _capability(xq.device.index or 0) >= (9, 0):
        out = torch._scaled_mm(
            xq,
            b,
            scale_a=x_scale.float().reshape(-1, 1).contiguous(),
            scale_b=w_scale.float().reshape(1, -1).contiguous(),
            out_dtype=out_dtype,
        )
    else:
        # Row-wise scaling (CUTLASS, sm90+) is bfloat16-only: unit scales into float32, then
        # the scales (also what Ada GPUs run).
        one = unit_scale(xq.device)
        out = torch._scaled_mm(xq, b, scale_a=one, scale_b=one, out_dtype=torch.float32)
        out = (out * x_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, -1)).to(out_dtype)
    return out if bias is None else out + bias
