"""One Triton pass from the fused qkv projection to attention's inputs.

Per token it reads the packed ``[q | k | v]`` row once and, in registers: applies the per-head
q/k RMSNorm (Qwen3; optional), rotates q and k (rotate-half rotary, cos/sin by position),
writes q back in place and stores k and v into their paged KV-cache slot. This replaces up to
seven kernels per layer (two copies for the norms' reshapes, two norms, rotary, two cache
scatters), which matters most for decode steps of small models, where each is a few µs.

Rounding follows the unfused kernels (and Hugging Face's bf16 code): the normed value is
rounded to the activation dtype before the weight multiply, and again before the rotation,
which is computed in fp32 and rounded once.

An fp8 cache (``layers/attention/kv_quant.py``) stores ``clamp(x / scale)`` with the layer's
(k_scale, v_scale) read from a device tensor (so a CUDA graph replays with current values):
k is first rounded to the activation dtype, as the unfused path hands it over, and divided with
IEEE rounding (``div_rn``), so the bytes equal the CPU reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@triton.jit
def _norm_rope(
    x1, x2, w_ptr, d, d_ok, cos, sin, eps,
    D: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr, DTYPE: tl.constexpr,
):  # fmt: skip
    """x1/x2: the two halves [H, HALF] (fp32) of each head; returns them rotated (fp32)."""
    if HAS_NORM:
        var = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D
        r = tl.rsqrt(var + eps)[:, None]
        w1 = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (x1 * r).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
        x2 = (w2 * (x2 * r).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _to_cache(x, s, DTYPE: tl.constexpr, KC: tl.constexpr, FP8: tl.constexpr, FMAX: tl.constexpr):
    """x (fp32) as the cache stores it: rounded once, or (fp8) ``clamp(dtype(x) / s)``."""
    if FP8:
        y = tl.div_rn(x.to(DTYPE).to(tl.float32), s)
        return tl.minimum(tl.maximum(y, -FMAX), FMAX).to(KC)
    return x.to(KC)


@triton.jit(do_not_specialize=["eps"])
def _qkv_rope_store_kernel(
    qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
    kv_scale_ptr, stride_qkv, stride_c, stride_slot, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr, FP8: tl.constexpr, FMAX: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    dtype = qkv_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < HALF
    cos = tl.load(cos_ptr + pos * stride_c + d, mask=d_ok, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_c + d, mask=d_ok, other=0.0)[None, :]
    row = qkv_ptr + t * stride_qkv

    hq = tl.arange(0, BLOCK_HQ)
    mq = (hq[:, None] < HQ) & d_ok[None, :]
    pq = row + hq[:, None] * D + d[None, :]
    q1 = tl.load(pq, mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(pq + HALF, mask=mq, other=0.0).to(tl.float32)
    q1, q2 = _norm_rope(q1, q2, qw_ptr, d, d_ok, cos, sin, eps, D, HALF, HAS_NORM, dtype)
    tl.store(pq, q1.to(dtype), mask=mq)
    tl.store(pq + HALF, q2.to(dtype), mask=mq)

    hk = tl.arange(0, BLOCK_HKV)
    mk = (hk[:, None] < HKV) & d_ok[None, :]
    pk = row + HQ * D + hk[:, None] * D + d[None, :]
    k1 = tl.load(pk, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(pk + HALF, mask=mk, other=0.0).to(tl.float32)
    k1, k2 = _norm_rope(k1, k2, kw_ptr, d, d_ok, cos, sin, eps, D, HALF, HAS_NORM, dtype)
    cache = slot * stride_slot + hk[:, None] * D + d[None, :]
    kc = k_cache_ptr.dtype.element_ty
    k_s = 1.0
    v_s = 1.0
    if FP8:
        k_s = tl.load(kv_scale_ptr)
        v_s = tl.load(kv_scale_ptr + 1)
    tl.store(k_cache_ptr + cache, _to_cache(k1, k_s, dtype, kc, FP8, FMAX), mask=mk)
    tl.store(k_cache_ptr + cache + HALF, _to_cache(k2, k_s, dtype, kc, FP8, FMAX), mask=mk)

    pv = pk + HKV * D
    v1 = tl.load(pv, mask=mk, other=0.0).to(tl.float32)
    v2 = tl.load(pv + HALF, mask=mk, other=0.0).to(tl.float32)
    tl.store(v_cache_ptr + cache, _to_cache(v1, v_s, dtype, kc, FP8, FMAX), mask=mk)
    tl.store(v_cache_ptr + cache + HALF, _to_cache(v2, v_s, dtype, kc, FP8, FMAX), mask=mk)


def qkv_rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalise (optionally) and rotate q/k of ``qkv`` [T, (Hq + 2 Hkv) * D]; store k/v.

    q is rotated in place and returned as a [T, Hq, D] view of ``qkv``; k and v go to
    ``kv_cache`` [2, num_blocks, block_size, Hkv, D] at ``slot_mapping`` [T]. cos/sin are
    [max_pos, D / 2] fp32. An fp8 ``kv_cache`` needs ``kv_scale``, the layer's [2] float32
    (k_scale, v_scale) on the device.
    """
    fp8 = kv_cache.dtype in _FP8_DTYPES
    if fp8:
        assert kv_scale is not None and kv_scale.dtype == torch.float32, "fp8 needs kv_scale"
        assert kv_scale.numel() == 2 and kv_scale.device == qkv.device
    t = qkv.shape[0]
    assert qkv.stride(1) == 1 and head_dim % 2 == 0
    assert kv_cache.shape[3] == num_kv_heads and kv_cache.shape[4] == head_dim
    assert kv_cache[0].stride(1) == num_kv_heads * head_dim  # slots are contiguous rows
    has_norm = q_norm_weight is not None and k_norm_weight is not None
    half = head_dim // 2
    if t:
        _qkv_rope_store_kernel[(t,)](
            qkv, positions, cos, sin,
            q_norm_weight if has_norm else cos, k_norm_weight if has_norm else cos,
            slot_mapping, kv_cache[0], kv_cache[1], kv_scale if fp8 else cos,
            qkv.stride(0), cos.stride(0), kv_cache.stride(2), eps,
            HQ=num_heads, HKV=num_kv_heads, D=head_dim, HALF=half,
            BLOCK_HQ=triton.next_power_of_2(num_heads),
            BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
            BLOCK_HALF=triton.next_power_of_2(half), HAS_NORM=has_norm,
            FP8=fp8, FMAX=float(torch.finfo(kv_cache.dtype).max) if fp8 else 0.0,
            num_warps=4,
        )  # fmt: skip
    return qkv[:, : num_heads * head_dim].view(t, num_heads, head_dim)
