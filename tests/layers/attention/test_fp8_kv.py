"""CPU: the scaled fp8 KV cache in the torch reference backend and the ``Attention`` layer.

What is exact: the bytes written are ``fp8(clamp(x / scale))`` (``kv_quant.quantize_kv``) at
the step's slots and nowhere else, and attention over an fp8 cache equals dense fp32
attention over the dequantized keys/values (``float(x) * scale``) to fp32 rounding
(1e-5 relative). What is within a
tolerance: the same attention against the unquantized keys/values, relative error below 5%
for e4m3 (3 mantissa bits: about 2-3% measured) and 10% for e5m2 (2 bits: about 5%). The
scales are far from 1, so ignoring one on write or on read fails these by orders of magnitude
(a backend that does exactly that is off by more than 5x the tolerance).
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.core.kv_cache_spec import KVCacheSpec
from pagedllm.layers.attention.kv_quant import (
    dequantize_kv,
    fp8_max,
    quantize_kv,
    scale_from_amax,
)
from pagedllm.layers.attention.layer import Attention
from pagedllm.layers.attention.torch_native import TorchNativeBackend
from tests.layers.attention.test_torch_native_backend import BS, HKV, HQ, D, _common, _dense

FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
TOL = {"fp8_e4m3": 0.05, "fp8_e5m2": 0.10}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", FP8)
def test_quantize_round_trip_and_saturation(name: str) -> None:
    dtype = FP8[name]
    torch.manual_seed(0)
    x = torch.randn(4096) * 7
    scale = scale_from_amax(x.abs().max(), dtype)
    assert scale.item() == pytest.approx(x.abs().max().item() / fp8_max(dtype))
    q = quantize_kv(x.bfloat16(), scale, dtype)
    assert q.dtype == dtype
    back = dequantize_kv(q, scale)
    mantissa_bits = 3 if name == "fp8_e4m3" else 2
    # Round to nearest: half a step of 2^-m relative, plus the subnormal floor.
    bound = x.abs() * 2.0 ** -(mantissa_bits + 1) * 1.01 + scale * 2.0**-9
    assert ((back - x.bfloat16().float()).abs() <= bound).all()
    # Out of range: saturate to the largest finite value, never NaN or inf.
    big = quantize_kv(torch.tensor([1e9, -1e9, float(x.abs().max()) * 3]), scale, dtype).float()
    assert big.tolist() == [fp8_max(dtype), -fp8_max(dtype), fp8_max(dtype)]
    assert scale_from_amax(torch.zeros(2), dtype).tolist() == [1.0, 1.0]  # nothing seen


class _IgnoreScale(TorchNativeBackend):
    """A broken backend: drops the scale on write or on read (the tests must catch both)."""

    def __init__(self, where: str) -> None:
        super().__init__(HQ, HKV, D, D**-0.5)
        self.where = where

    def write_kv(self, kv_cache, k, v, slot_mapping, kv_scale=None) -> None:  # type: ignore[no-untyped-def]
        ones = torch.ones_like(kv_scale) if self.where == "write" else kv_scale
        super().write_kv(kv_cache, k, v, slot_mapping, ones)

    def attend(self, q, kv_cache, meta, kv_scale=None):  # type: ignore[no-untyped-def]
        ones = torch.ones_like(kv_scale) if self.where == "read" else kv_scale
        return super().attend(q, kv_cache, meta, ones)


def _run(backend: TorchNativeBackend, name: str, seed: int = 0):  # type: ignore[no-untyped-def]
    """A mixed step (a prompt chunk after cached context, decodes) over an fp8 cache whose
    context was written in an earlier step. Returns (out, cache, fp32 reference, inputs)."""
    torch.manual_seed(seed)
    q_lens, ctx_lens = [5, 1, 1], [3, 9, 0]
    common, ctx_slots = _common(q_lens, ctx_lens, num_blocks=8)
    t = common.query_start_loc_cpu[-1]
    q = torch.randn(t, HQ, D) / 30  # scores of order 1 against keys of order 30
    k, v = torch.randn(t, HKV, D) * 30, torch.randn(t, HKV, D) * 30
    ctx_k = [torch.randn(len(s), HKV, D) * 30 for s in ctx_slots]
    ctx_v = [torch.randn(len(s), HKV, D) * 30 for s in ctx_slots]
    spec = KVCacheSpec(num_layers=1, block_size=BS, num_kv_heads=HKV, head_dim=D, dtype=name)
    (cache,) = backend.allocate_kv_cache(8, spec, torch.device("cpu"))
    amax_k = torch.cat([k, *ctx_k]).abs().max()
    amax_v = torch.cat([v, *ctx_v]).abs().max()
    kv_scale = torch.stack([scale_from_amax(amax_k, FP8[name]), scale_from_amax(amax_v, FP8[name])])
    for slots, ck, cv in zip(ctx_slots, ctx_k, ctx_v, strict=True):
        if len(slots):
            backend.write_kv(cache, ck, cv, torch.tensor(slots), kv_scale)
    out = backend.forward(q, k, v, cache, backend.build_metadata(common), kv_scale)
    ref = []
    qsl = common.query_start_loc_cpu
    for i in range(len(q_lens)):
        rows = slice(qsl[i], qsl[i + 1])
        keys, vals = torch.cat([ctx_k[i], k[rows]]), torch.cat([ctx_v[i], v[rows]])
        ref.append(_dense(q[rows], keys, vals, D**-0.5))
    return out, cache, torch.cat(ref), (common, ctx_slots, q, k, v, ctx_k, ctx_v, kv_scale)


@pytest.mark.parametrize("name", FP8)
def test_fp8_cache_write_and_attend(name: str) -> None:
    dtype = FP8[name]
    backend = TorchNativeBackend(HQ, HKV, D, D**-0.5)
    out, cache, ref, extra = _run(backend, name)
    common, ctx_slots, q, k, v, ctx_k, ctx_v, kv_scale = extra
    assert cache.dtype == dtype
    flat = cache.view(2, -1, HKV, D)
    # The bytes: clamp(x / scale) at the step's slots, zeros everywhere else.
    written = torch.zeros(flat.shape[1], dtype=torch.bool)
    new_slots = common.slot_mapping
    assert torch.equal(
        flat[0, new_slots].view(torch.uint8), quantize_kv(k, kv_scale[0], dtype).view(torch.uint8)
    )
    assert torch.equal(
        flat[1, new_slots].view(torch.uint8), quantize_kv(v, kv_scale[1], dtype).view(torch.uint8)
    )
    written[new_slots] = True
    for s in ctx_slots:
        written[s] = True
    assert (flat[:, ~written].view(torch.uint8) == 0).all()
    # Exact against dense attention over the dequantized values.
    qsl = common.query_start_loc_cpu
    for i in range(3):
        rows = slice(qsl[i], qsl[i + 1])
        keys = dequantize_kv(
            quantize_kv(torch.cat([ctx_k[i], k[rows]]), kv_scale[0], dtype), kv_scale[0]
        )
        vals = dequantize_kv(
            quantize_kv(torch.cat([ctx_v[i], v[rows]]), kv_scale[1], dtype), kv_scale[1]
        )
        assert torch.allclose(
            out[rows].double(), _dense(q[rows], keys, vals, D**-0.5), rtol=1e-5, atol=1e-4
        )
    # Within the stated tolerance of unquantized attention.
    assert _rel(out, ref) < TOL[name]


@pytest.mark.parametrize("name", FP8)
@pytest.mark.parametrize("where", ["write", "read"])
def test_a_dropped_scale_is_caught(name: str, where: str) -> None:
    out, _, ref, _ = _run(_IgnoreScale(where), name)
    assert _rel(out, ref) > 5 * TOL[name]


def test_fp8_cache_needs_scales() -> None:
    backend = TorchNativeBackend(HQ, HKV, D, D**-0.5)
    spec = KVCacheSpec(num_layers=1, block_size=BS, num_kv_heads=HKV, head_dim=D, dtype="fp8_e4m3")
    (cache,) = backend.allocate_kv_cache(2, spec, torch.device("cpu"))
    k = torch.randn(1, HKV, D)
    with pytest.raises(ValueError, match="needs the layer's kv_scale to write"):
        backend.write_kv(cache, k, k, torch.tensor([0]))
    common, _ = _common([1], [0], num_blocks=2)
    with pytest.raises(ValueError, match="needs the layer's kv_scale to read"):
        backend.attend(torch.randn(1, HQ, D), cache, backend.build_metadata(common))


def test_layer_scales_are_set_in_place() -> None:
    layer = Attention(HQ, HKV, D, D**-0.5)
    assert layer.kv_scale.tolist() == [1.0, 1.0] and layer.kv_scale.dtype == torch.float32
    assert layer.kv_scale_source == "default"
    ptr = layer.kv_scale.data_ptr()
    layer.set_kv_scale(0.5, torch.tensor(0.25), "checkpoint")
    assert layer.kv_scale.tolist() == [0.5, 0.25] and layer.kv_scale.data_ptr() == ptr
    assert layer.kv_scale_source == "checkpoint"
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="k_scale must be a positive finite number"):
            layer.set_kv_scale(bad, 1.0, "checkpoint")
    assert layer.kv_scale.tolist() == [0.5, 0.25]  # unchanged by a rejected value
