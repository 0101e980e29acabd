"""Scaled fp8 KV cache: the one definition of how a key/value is stored and read back.

An fp8 cache stores ``q = fp8(clamp(x / scale, -fmax, fmax))`` and attention reads
``x ~= float(q) * scale``, with one float32 scale for K and one for V per layer (per tensor,
as vLLM's ``k_scale`` / ``v_scale``). ``x`` is first rounded to the activation dtype, as the
unfused ops hand it over, so the CPU reference here and the Triton write kernel
(``kernels/qkv_rope.py``) store the same bytes. Clamping first makes an out-of-range value
saturate instead of becoming NaN (e4m3fn has no infinity) or inf (e5m2).

The scales of a layer are one ``[2]`` float32 device tensor (k, v) that the ``Attention``
layer owns and the kernels read through a pointer: updating it in place (checkpoint scales,
start-up calibration) never changes its address, so captured CUDA graphs stay valid.
Where they come from: the checkpoint (``models/loader.py``), else the amax of K and V seen
by the profiling pass (``worker/kv_pool_size.py``) over ``fmax``, else 1.0.
"""

from __future__ import annotations

import torch

# KVCacheSpec dtype name -> torch dtype of the scaled fp8 caches.
FP8_TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is one of the scaled fp8 cache dtypes."""
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of fp8 ``dtype`` (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def new_kv_scale(device: torch.device | str | None = None) -> torch.Tensor:
    """A layer's (k_scale, v_scale): a ``[2]`` float32 tensor of ones."""
    return torch.ones(2, dtype=torch.float32, device=device)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (any float dtype) stored as fp8 ``dtype``: ``clamp(x / scale)``, rounded to
    nearest even. ``scale`` is a 0-d or 1-element float32 tensor."""
    m = fp8_max(dtype)
    return (x.float() / scale.float()).clamp_(-m, m).to(dtype)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 values back to float32: ``float(x) * scale``."""
    return x.float() * scale.float()


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The per-tensor scale that maps ``amax`` to fp8 ``dtype``'s largest value (1.0 where
    nothing was seen, so an all-zero calibration cannot make a zero or NaN scale)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / fp8_max(dtype), torch.ones_like(amax))
