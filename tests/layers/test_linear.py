"""Linear layers: shard loaders, error messages, the dense method, the quantization hook and
the skinny-GEMM dispatch threshold (CPU; the real Triton kernel is in tests/kernels)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.layers import quantization as quant
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pagedllm.layers.weight_utils import default_weight_loader, set_weight_attrs

PREFIX = "model.layers.0.self_attn.qkv_proj"


def _load(layer: nn.Module, name: str, tensor: torch.Tensor, shard_id: Any = None) -> None:
    param = getattr(layer, name)
    if shard_id is None:
        param.weight_loader(param, tensor)
    else:
        param.weight_loader(param, tensor, shard_id)


def _qkv() -> QKVParallelLinear:
    # hidden 8, head_dim 4, 4 query heads (16 rows), 2 KV heads (8 rows each).
    return QKVParallelLinear(8, 4, 4, 2, bias=True, prefix=PREFIX)


def test_qkv_loader_puts_each_shard_in_its_rows() -> None:
    layer = _qkv()
    q, k, v = torch.randn(16, 8), torch.randn(8, 8), torch.randn(8, 8)
    qb, kb, vb = torch.randn(16), torch.randn(8), torch.randn(8)
    for sid, w, b in (("v", v, vb), ("q", q, qb), ("k", k, kb)):  # any order
        _load(layer, "weight", w, sid)
        _load(layer, "bias", b, sid)
    assert torch.equal(layer.weight[:16], q)
    assert torch.equal(layer.weight[16:24], k)
    assert torch.equal(layer.weight[24:], v)
    assert torch.equal(layer.bias, torch.cat([qb, kb, vb]))


def test_gate_up_loader_and_fused_checkpoint_tensor() -> None:
    layer = MergedColumnParallelLinear(8, [12, 12])
    gate, up = torch.randn(12, 8), torch.randn(12, 8)
    _load(layer, "weight", up, 1)
    _load(layer, "weight", gate, 0)
    assert torch.equal(layer.weight[:12], gate) and torch.equal(layer.weight[12:], up)
    fused = torch.randn(24, 8)  # a checkpoint that already stores gate_up_proj
    _load(layer, "weight", fused)
    assert torch.equal(layer.weight, fused)


def test_shape_mismatch_names_parameter_shard_and_both_shapes() -> None:
    layer = _qkv()
    with pytest.raises(ValueError) as err:
        _load(layer, "weight", torch.randn(4, 8), "k")
    msg = str(err.value)
    assert f"{PREFIX}.weight (shard 'k')" in msg and "(8, 8)" in msg and "(4, 8)" in msg
    with pytest.raises(ValueError, match=r"qkv_proj\.bias \(shard 'q'\).*\(16,\).*\(15,\)"):
        _load(layer, "bias", torch.randn(15), "q")
    with pytest.raises(ValueError, match=r"unknown shard id"):
        _load(layer, "weight", torch.randn(8, 8), "x")
    with pytest.raises(ValueError, match=r"o_proj\.weight expects shape \(8, 16\).*\(8, 12\)"):
        o_proj = RowParallelLinear(16, 8, prefix="model.layers.0.self_attn.o_proj")
        _load(o_proj, "weight", torch.randn(8, 12))
    for cls in (ReplicatedLinear, ColumnParallelLinear):
        with pytest.raises(ValueError, match=r"^proj\.weight expects shape \(6, 4\).*\(4, 6\)"):
            _load(cls(4, 6, prefix="proj"), "weight", torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"embed_tokens\.weight expects shape \(10, 4\)"):
        _load(VocabParallelEmbedding(10, 4, prefix="embed_tokens"), "weight", torch.randn(11, 4))
    with pytest.raises(ValueError, match=r"expects shape \(3,\).*\(4,\)"):
        default_weight_loader(nn.Parameter(torch.ones(3)), torch.ones(4))


@pytest.mark.parametrize("bias", [False, True])
def test_unquantized_apply_equals_f_linear(bias: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    layers = [
        ReplicatedLinear(16, 6, bias=bias),
        ColumnParallelLinear(16, 6, bias=bias),
        MergedColumnParallelLinear(16, [6, 6], bias=bias),
        QKVParallelLinear(16, 4, 2, 1, bias=bias),
        RowParallelLinear(16, 6, bias=bias),
    ]
    for layer in layers:
        assert isinstance(layer.quant_method, quant.UnquantizedLinearMethod)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_()
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    head = ParallelLMHead(10, 16)
    head.weight.data.normal_()
    assert torch.equal(head(x), F.linear(x, head.weight))
    embed = VocabParallelEmbedding(10, 16)
    embed.weight.data.normal_()  # torch.empty may hold NaNs, which never compare equal
    assert head.tie_weights(embed).weight is embed.weight


class _FakeMethod(quant.LinearMethodBase):
    """An AWQ-like layout: int32 ``qweight`` [in, out / 8] packed along outputs, plus
    ``scales`` [1, out] and ``g_idx`` [in] (not split along outputs)."""

    def __init__(self) -> None:
        self.created: list[tuple[int, list[int]]] = []
        self.applied = 0

    def create_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size,
        output_size, params_dtype, **extra,
    ):  # type: ignore[no-untyped-def]  # fmt: skip
        self.created.append((input_size_per_partition, list(output_partition_sizes)))
        out = sum(output_partition_sizes)
        specs = {
            "qweight": (torch.empty(input_size_per_partition, out // 8, dtype=torch.int32),
                        {"input_dim": 0, "output_dim": 1, "packed_dim": 1, "packed_factor": 8}),
            "scales": (torch.empty(1, out), {"output_dim": 1}),
            "g_idx": (torch.empty(input_size_per_partition, dtype=torch.int32), {"input_dim": 0}),
        }  # fmt: skip
        for name, (data, attrs) in specs.items():
            param = nn.Parameter(data, requires_grad=False)
            set_weight_attrs(param, {**attrs, **extra})
            layer.register_parameter(name, param)

    def apply(self, layer, x, bias=None):  # type: ignore[no-untyped-def]
        self.applied += 1
        return x.new_zeros(x.shape[0], layer.scales.shape[1])


class _FakeConfig(quant.QuantizationConfig):
    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _FakeConfig:
        return cls()

    def get_quant_method(self, layer: nn.Module, prefix: str) -> quant.LinearMethodBase | None:
        return None if prefix == "lm_head" else _FakeMethod()


def test_fake_quant_method_plugs_in_through_the_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant, "QUANTIZATION_METHODS", {})
    quant.register_quantization_config("fake")(_FakeConfig)
    engine_cfg = types.SimpleNamespace(
        model_config=types.SimpleNamespace(
            arch=types.SimpleNamespace(raw={"quantization_config": {"quant_method": "FAKE"}})
        )
    )
    cfg = quant.get_quant_config(engine_cfg)  # type: ignore[arg-type]
    assert isinstance(cfg, _FakeConfig)
    layer = QKVParallelLinear(16, 8, 4, 2, quant_config=cfg, prefix=PREFIX)
    method = layer.quant_method
    assert isinstance(method, _FakeMethod) and method.created == [(16, [32, 16, 16])]
    assert not hasattr(layer, "weight") and layer.qweight.shape == (16, 8)
    k = torch.arange(16 * 2, dtype=torch.int32).view(16, 2)  # k_proj.qweight: 16 cols / 8
    _load(layer, "qweight", k, "k")
    assert torch.equal(layer.qweight[:, 4:6], k)  # after q's 32 / 8 = 4 packed columns
    _load(layer, "scales", torch.ones(1, 16), "v")
    assert torch.equal(layer.scales[:, 48:], torch.ones(1, 16))
    g_idx = torch.arange(16, dtype=torch.int32)
    _load(layer, "g_idx", g_idx, "q")
    assert torch.equal(layer.g_idx, g_idx)
    assert layer(torch.randn(3, 16)).shape == (3, 64) and method.applied == 1
    head = ParallelLMHead(10, 16, quant_config=cfg, prefix="lm_head")
    assert isinstance(head.quant_method, quant.UnquantizedLinearMethod)
    monkeypatch.setattr(quant, "QUANTIZATION_METHODS", {})
    with pytest.raises(ValueError, match=r"quantization method 'fake'.*not support"):
        quant.get_quant_config(engine_cfg)  # type: ignore[arg-type]


def test_skinny_dispatch_honours_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def skinny_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        calls.append(x.shape[0])
        return F.linear(x, w, b)

    fake = types.ModuleType("pagedllm.kernels.skinny_gemm")
    fake.skinny_linear = skinny_linear  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pagedllm.kernels.skinny_gemm", fake)
    layers = [RowParallelLinear(8, 4, bias=True), ParallelLMHead(12, 8)]
    for layer in layers:
        layer.weight.data.normal_()
        for m in range(7):
            layer(torch.randn(m, 8))
        assert calls == []  # default threshold 0: never
        layer.skinny_max_rows = 4
        for m in range(7):
            x = torch.randn(m, 8)
            assert torch.allclose(layer(x), F.linear(x, layer.weight, getattr(layer, "bias", None)))
        assert calls == [1, 2, 3, 4]
        layer(torch.randn(8, 2).t())  # not unit-stride in K: F.linear
        layer(torch.randn(1, 2, 8))  # not 2-D: F.linear
        assert calls == [1, 2, 3, 4]
        calls.clear()
