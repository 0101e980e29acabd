"""fp8 linear layers: the quantization math, checkpoint parts through the fused loaders, errors.

References are written here with plain torch from the definitions (e4m3 = ``torch.float8_e4m3fn``,
scale = row absmax / 448): per-row weight scales, per-token activation scales, per-part scales of
fused layers. Weights have rows of very different magnitudes, so a scale applied along the wrong
axis, or a part's scale written into another part's rows, changes outputs far beyond tolerance.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pagedllm.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pagedllm.layers.quantization.fp8 import Fp8Config
from pagedllm.layers.quantization.fp8_utils import fp8_linear_reference, quantize_rows
from pagedllm.models.loader import process_weights_after_loading

E4M3 = torch.float8_e4m3fn
ONLINE = Fp8Config.quantize_at_load()
DYNAMIC = Fp8Config.from_config({"quant_method": "fp8", "activation_scheme": "dynamic"})
STATIC = Fp8Config.from_config({"quant_method": "fp8", "activation_scheme": "static"})


def _qdq_rows(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize each row of ``x`` to e4m3 with scale absmax / 448 (the definition)."""
    scale = x.abs().amax(dim=1, keepdim=True) / 448.0
    return (x / scale).to(E4M3).float() * scale


def _uneven_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Rows whose magnitudes span 1e-3..1e2: only per-row scales keep every row accurate."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * torch.logspace(-3, 2, n).unsqueeze(1)


def test_quantize_rows_scales_each_row() -> None:
    w = _uneven_weight(24, 40, seed=0)
    q, scale = quantize_rows(w)
    assert q.dtype == E4M3 and scale.shape == (24,) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / 448.0)
    back = q.float() * scale.unsqueeze(1)
    torch.testing.assert_close(back, _qdq_rows(w))
    # e4m3 keeps 3 mantissa bits: every element within 1/16 of itself (relative), row by row.
    rel = ((back - w).abs() / w.abs().amax(dim=1, keepdim=True)).max()
    assert rel <= 1 / 16
    zero_q, zero_scale = quantize_rows(torch.zeros(2, 8))  # no division by zero
    assert torch.isfinite(zero_scale).all() and (zero_q.float() == 0).all()


def test_online_quantization_is_per_output_channel_and_per_token() -> None:
    k, n = 48, 32
    gen = torch.Generator().manual_seed(1)
    w, bias = _uneven_weight(n, k, seed=1), torch.randn(n, generator=gen)
    layer = ReplicatedLinear(k, n, bias=True, quant_config=ONLINE, prefix="o")
    layer.weight.weight_loader(layer.weight, w)
    layer.bias.weight_loader(layer.bias, bias)
    process_weights_after_loading(layer)
    assert layer.weight.dtype == E4M3 and layer.weight_scale.shape == (n,)
    # Tokens of very different magnitudes: one scale per token.
    x = torch.randn(6, k, generator=gen) * torch.logspace(-2, 2, 6).unsqueeze(1)
    expected = _qdq_rows(x) @ _qdq_rows(w).T + bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer(x.view(2, 3, k)), expected.view(2, 3, n), rtol=1e-5, atol=1e-4)
    # ... and close to the dense layer: e4m3 rounds each operand by up to 1/16 (relative), so
    # a token's output is within ~0.15 of its size (a misplaced scale is off by far more).
    dense = x @ w.T + bias
    assert ((layer(x) - dense).norm(dim=1) / dense.norm(dim=1)).max() < 0.15


def _fp8_part(n: int, k: int, seed: int, per_channel: bool) -> dict[str, torch.Tensor]:
    """An llm-compressor style part: e4m3 ``weight``, ``weight_scale`` (scalar, or [n, 1])."""
    w = _uneven_weight(n, k, seed)
    if per_channel:
        scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    else:
        scale = w.abs().amax().reshape(()) / 448.0
    return {"weight": (w / scale).to(E4M3), "weight_scale": scale}


def _dense_of(part: dict[str, torch.Tensor]) -> torch.Tensor:
    scale = part["weight_scale"]
    return part["weight"].float() * (scale if scale.dim() == 2 else scale.reshape(1, 1))


def _load(layer: torch.nn.Module, tensors: dict[str, torch.Tensor], shard: Any = None) -> None:
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        args = (param, tensor) if shard is None else (param, tensor, shard)
        param.weight_loader(*args)


def test_checkpoint_parts_keep_their_own_scales() -> None:
    k, head, heads, kv_heads = 64, 16, 4, 2
    qkv = QKVParallelLinear(k, head, heads, kv_heads, quant_config=DYNAMIC, prefix="qkv")
    sizes = {"q": heads * head, "k": kv_heads * head, "v": kv_heads * head}
    # Per-tensor scales that differ by 100x between parts, and one per-channel part.
    parts = {s: _fp8_part(n, k, i, per_channel=s == "k") for i, (s, n) in enumerate(sizes.items())}
    parts["v"]["weight_scale"] = parts["v"]["weight_scale"] * 100
    for s, tensors in parts.items():
        _load(qkv, tensors, s)
    process_weights_after_loading(qkv)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(5))
    dense = torch.cat([_dense_of(parts[s]) for s in sizes])
    torch.testing.assert_close(qkv(x), _qdq_rows(x) @ dense.T, rtol=1e-5, atol=1e-4)

    gate_up = MergedColumnParallelLinear(k, [32, 32], quant_config=DYNAMIC, prefix="gate_up")
    gu = [_fp8_part(32, k, 10 + i, per_channel=True) for i in range(2)]
    # A fused checkpoint tensor (both parts stacked) is split by the layer's loader.
    _load(gate_up, {n: torch.cat([gu[0][n], gu[1][n]]) for n in ("weight", "weight_scale")})
    process_weights_after_loading(gate_up)
    dense = torch.cat([_dense_of(p) for p in gu])
    torch.testing.assert_close(gate_up(x), _qdq_rows(x) @ dense.T, rtol=1e-5, atol=1e-4)


def test_static_activation_scale_is_the_largest_part_scale() -> None:
    k = 32
    gate_up = MergedColumnParallelLinear(k, [16, 16], quant_config=STATIC, prefix="gate_up")
    gu = [_fp8_part(16, k, 20 + i, per_channel=False) for i in range(2)]
    scales = [torch.tensor(0.01), torch.tensor(0.004)]
    for i, (part, s) in enumerate(zip(gu, scales, strict=True)):
        _load(gate_up, {**part, "input_scale": s}, i)
    process_weights_after_loading(gate_up)
    assert float(gate_up.input_scale) == pytest.approx(0.01)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(4))
    x_deq = (x / 0.01).clamp(-448, 448).to(E4M3).float() * 0.01
    dense = torch.cat([_dense_of(p) for p in gu])
    torch.testing.assert_close(gate_up(x), x_deq @ dense.T, rtol=1e-5, atol=1e-4)


def test_reference_gemm_is_dequantize_then_matmul() -> None:
    gen = torch.Generator().manual_seed(3)
    xq, x_scale = quantize_rows(torch.randn(7, 32, generator=gen))
    wq, w_scale = quantize_rows(torch.randn(16, 32, generator=gen))
    bias = torch.randn(16, generator=gen)
    out = fp8_linear_reference(xq, x_scale, wq, w_scale, torch.float32, bias)
    expected = (xq.float() @ wq.float().T) * x_scale[:, None] * w_scale[None, :] + bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_errors_name_the_problem() -> None:
    layer = RowParallelLinear(32, 16, quant_config=DYNAMIC, prefix="down")
    with pytest.raises(ValueError, match="must be float8_e4m3fn, got torch.bfloat16"):
        layer.weight.weight_loader(layer.weight, torch.zeros(16, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"weight_scale of shape \(2, 8\) is neither per-tensor"):
        layer.weight_scale.weight_loader(layer.weight_scale, torch.ones(2, 8))
    layer.weight.weight_loader(layer.weight, torch.zeros(16, 32, dtype=E4M3))
    layer.weight_scale.weight_loader(layer.weight_scale, torch.tensor(-1.0))
    with pytest.raises(ValueError, match="down.weight_scale has non-positive"):
        process_weights_after_loading(layer)
    static = ReplicatedLinear(32, 16, quant_config=STATIC, prefix="o")
    with pytest.raises(ValueError, match=r"input_scale must be one value .* shape \(16,\)"):
        static.input_scale.weight_loader(static.input_scale, torch.ones(16))
    qkv = QKVParallelLinear(32, 16, 2, 1, quant_config=DYNAMIC, prefix="qkv")
    with pytest.raises(ValueError, match="unknown shard id 'x'"):
        qkv.weight_scale.weight_loader(qkv.weight_scale, torch.tensor(1.0), "x")


def test_config_errors_and_ignored_layers() -> None:
    with pytest.raises(ValueError, match=r"weight_block_size=\[128, 128\] are not supported"):
        Fp8Config.from_config({"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match="activation_scheme 'per_group' is not supported"):
        Fp8Config.from_config({"quant_method": "fp8", "activation_scheme": "per_group"})
    cfg = Fp8Config.from_config(
        {"quant_method": "fp8", "ignored_layers": ["model.layers.0.mlp.down_proj", "q_proj"]}
    )
    assert cfg.is_ignored("model.layers.0.mlp.down_proj")
    assert not cfg.is_ignored("model.layers.1.mlp.down_proj")
    section = {"quant_method": "fp8", "modules_to_not_convert": ["model.layers.1"]}
    parent = Fp8Config.from_config(section)  # a parent module covers its children
    assert parent.is_ignored("model.layers.1.mlp.down_proj")
    assert not parent.is_ignored("model.layers.11.mlp.down_proj")
    down = RowParallelLinear(32, 16, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    assert down.weight.dtype == torch.get_default_dtype()  # left dense
    attn = "model.layers.0.self_attn"
    with pytest.raises(ValueError, match="ignores only some of its fused parts"):
        QKVParallelLinear(32, 16, 2, 1, quant_config=cfg, prefix=f"{attn}.qkv_proj")


def test_dummy_construction_values_are_finite() -> None:
    layer = RowParallelLinear(64, 32, quant_config=DYNAMIC, prefix="down")
    assert layer.weight.dtype == E4M3 and torch.isfinite(layer.weight.float()).all()
    assert layer.weight.dummy_keep and layer.weight_scale.dummy_keep
    process_weights_after_loading(layer)
    assert torch.isfinite(layer(torch.ones(3, 64))).all()
