"""GPTQ / AWQ linear layers: unpacking, fused parts lining up with the packing, loader checks.

Quantized tensors are packed here from random integers by :func:`pack` (the formats written
out by hand), loaded part by part through the layers' own loaders, and compared with the
dense layer of the same integers (``spec_dequantize`` of the end-to-end tests).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from pagedllm.config import EngineConfig
from pagedllm.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pagedllm.layers.quantization.awq import AWQConfig
from pagedllm.layers.quantization.gptq import GPTQConfig
from pagedllm.layers.quantization.packing import AWQ_ORDER, gptq_zeros, unpack_cols, unpack_rows
from pagedllm.models.loader import load_model, process_weights_after_loading
from tests.fixtures.quantized_models import checkpoint_path, materialize
from tests.models.test_quant_models import AWQ_COLUMN_OF_VALUE, spec_dequantize

# ------------------------------------------------------------------ packing by hand


def _words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., pf] values -> [...] int32 words, value i in bits [i * bits, (i + 1) * bits)."""
    word = torch.zeros(values.shape[:-1], dtype=torch.int64)
    for i in range(values.shape[-1]):
        word |= values[..., i].to(torch.int64) << (bits * i)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def pack(kind: str, q: torch.Tensor, z: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """``q`` [K, N] and zero points ``z`` [G, N] as GPTQ (v1) or AWQ GEMM tensors."""
    pf = 32 // bits
    if kind == "gptq":
        qweight = _words(q.reshape(-1, pf, q.shape[1]).transpose(1, 2), bits)  # [K/pf, N]
        zeros = _words(z.reshape(z.shape[0], -1, pf), bits)  # [G, N/pf]
        offset = sum(1 << (bits * i) for i in range(pf))
        v1 = (zeros.to(torch.int64) - offset) & 0xFFFFFFFF  # the v1 writer's subtraction
        return {
            "qweight": qweight,
            "qzeros": torch.where(v1 >= 1 << 31, v1 - (1 << 32), v1).to(torch.int32),
        }
    order = list(AWQ_COLUMN_OF_VALUE)  # value i of a word is column order[i]
    return {
        "qweight": _words(q.reshape(q.shape[0], -1, 8)[..., order], 4),
        "qzeros": _words(z.reshape(z.shape[0], -1, 8)[..., order], 4),
    }


def random_layer(
    kind: str, k: int, n: int, bits: int, group: int, act_order: bool, seed: int
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else k // group
    q = torch.randint(0, 1 << bits, (k, n), generator=gen)
    z = torch.randint(0, 1 << bits, (groups, n), generator=gen)
    z[0, :3] = 0  # zero points of 0: the v1 writer's subtraction borrows from the next value
    out = pack(kind, q, z, bits)
    out["scales"] = torch.rand(groups, n, generator=gen).half() / 100 + 1e-3
    g_idx = torch.arange(k) // (k if group == -1 else group)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    if kind == "gptq":
        out["g_idx"] = g_idx.to(torch.int32)
    return out


def test_unpacking_orders() -> None:
    word = _words(torch.arange(8).view(1, 1, 8), 4)  # value i holds i
    assert unpack_rows(word, 4).flatten().tolist() == list(range(8))
    assert unpack_cols(word, 4).flatten().tolist() == list(range(8))
    # AWQ: value i is column (0, 2, 4, 6, 1, 3, 5, 7)[i], so the columns hold these i.
    assert unpack_cols(word, 4, AWQ_ORDER).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    bytes8 = _words(torch.tensor([[[1, 2, 255, 0]]]), 8)
    assert unpack_cols(bytes8, 8).flatten().tolist() == [1, 2, 255, 0]


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_v1_zero_points_survive_borrows(bits: int) -> None:
    z = torch.tensor([[0, 5, 0, 0, (1 << bits) - 1, 1, 0, 2][: 32 // bits * 2]])
    packed = pack("gptq", torch.zeros(32 // bits, z.shape[1], dtype=torch.long), z, bits)
    assert torch.equal(gptq_zeros(packed["qzeros"], bits), z.to(torch.int32))


# ------------------------------------------------------------------ layers

GPTQ = GPTQConfig(bits=4, group_size=32, desc_act=True, sym=False)


def _load(layer: torch.nn.Module, tensors: dict[str, torch.Tensor], shard: Any = None) -> None:
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        if shard is None:
            param.weight_loader(param, tensor)
        else:
            param.weight_loader(param, tensor, shard)


def _dense(kind: str, tensors: dict[str, torch.Tensor], bits: int, group: int) -> torch.Tensor:
    return spec_dequantize(kind, tensors, bits, group)  # [N, K]


@pytest.mark.parametrize(
    "kind,bits,group,act_order",
    [
        ("gptq", 4, 32, True),
        ("gptq", 4, -1, False),
        ("gptq", 8, 64, True),
        ("awq", 4, 32, False),
        ("awq", 4, -1, False),
    ],
)
def test_fused_parts_line_up_with_the_packing(
    kind: str, bits: int, group: int, act_order: bool
) -> None:
    cfg = (
        GPTQConfig(bits=bits, group_size=group, desc_act=act_order, sym=False)
        if kind == "gptq"
        else AWQConfig(group_size=group)
    )
    k, head, heads, kv_heads = 128, 16, 4, 2
    qkv = QKVParallelLinear(k, head, heads, kv_heads, bias=True, quant_config=cfg, prefix="qkv")
    sizes = {"q": heads * head, "k": kv_heads * head, "v": kv_heads * head}
    parts = {
        s: random_layer(kind, k, n, bits, group, act_order, seed=i)
        for i, (s, n) in enumerate(sizes.items())
    }
    if kind == "gptq":  # one input, one act-order: the parts share g_idx
        for s in ("k", "v"):
            parts[s]["g_idx"] = parts["q"]["g_idx"]
    for s, tensors in parts.items():
        _load(qkv, tensors, s)
    bias = torch.randn(sum(sizes.values()))
    _load(qkv, {"bias": bias})
    process_weights_after_loading(qkv)
    x = torch.randn(5, k)
    dense = torch.cat([_dense(kind, parts[s], bits, group) for s in sizes])
    torch.testing.assert_close(qkv(x), x @ dense.T + bias, rtol=1e-5, atol=1e-5)

    gate_up = MergedColumnParallelLinear(k, [48, 48], quant_config=cfg, prefix="gate_up")
    gu = [random_layer(kind, k, 48, bits, group, act_order, seed=10 + i) for i in range(2)]
    if kind == "gptq":
        gu[1]["g_idx"] = gu[0]["g_idx"]
    # A fused checkpoint tensor (both parts side by side) splits at the packed boundary.
    fused = {name: torch.cat([gu[0][name], gu[1][name]], dim=-1) for name in gu[0]}
    if kind == "gptq":
        fused["g_idx"] = gu[0]["g_idx"]
    _load(gate_up, fused)
    process_weights_after_loading(gate_up)
    dense = torch.cat([_dense(kind, part, bits, group) for part in gu])
    torch.testing.assert_close(gate_up(x), x @ dense.T, rtol=1e-5, atol=1e-5)

    down = RowParallelLinear(k, 64, quant_config=cfg, prefix="down")
    tensors = random_layer(kind, k, 64, bits, group, act_order, seed=20)
    _load(down, tensors)
    with pytest.raises(RuntimeError, match="down: process_weights_after_loading has not run"):
        down(x)
    words = down.qweight.data_ptr()
    process_weights_after_loading(down)
    # GPTQ without act-order already has the layout: its words are kept, not copied.
    assert (down.w_packed.data_ptr() == words) == (kind == "gptq" and not act_order)
    # The checkpoint's tensors gave way to the one layout: the weights are held once.
    assert {n for n, _ in down.named_parameters()} == {"scales"}
    assert down.w_packed.shape == (k * bits // 32, 64) and down.w_zeros.dtype == torch.uint8
    assert (down.w_perm is not None) == act_order
    for layer in (qkv, gate_up, down):  # the GPU kernel indexes them as dense row-major
        assert layer.w_packed.is_contiguous() and layer.w_zeros.is_contiguous()
        assert layer.scales.is_contiguous()
    torch.testing.assert_close(
        down(x), x @ _dense(kind, tensors, bits, group).T, rtol=1e-5, atol=1e-5
    )


def test_parts_that_split_a_packed_word_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"qkv output part 1 \(4\) is not a multiple of 8"):
        QKVParallelLinear(64, 4, 4, 1, quant_config=AWQConfig(group_size=32), prefix="qkv")
    with pytest.raises(ValueError, match=r"input size \(96\) is not a multiple of 64"):
        ReplicatedLinear(96, 64, quant_config=GPTQConfig(4, 64, False, True), prefix="o")


def test_parts_with_different_act_orders_are_rejected() -> None:
    qkv = QKVParallelLinear(64, 16, 2, 1, quant_config=GPTQ, prefix="qkv")
    g_idx = torch.arange(64, dtype=torch.int32) // 32
    qkv.g_idx.weight_loader(qkv.g_idx, g_idx, "q")
    qkv.g_idx.weight_loader(qkv.g_idx, g_idx.clone(), "k")
    with pytest.raises(ValueError, match="g_idx of part 'v' differs from part 'q'"):
        qkv.g_idx.weight_loader(qkv.g_idx, g_idx.flip(0), "v")


def test_g_idx_outside_the_groups_is_rejected() -> None:
    layer = ReplicatedLinear(64, 32, quant_config=GPTQ, prefix="o")
    layer.g_idx.weight_loader(layer.g_idx, torch.full((64,), 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"o.g_idx has groups outside \[0, 2\)"):
        process_weights_after_loading(layer)


# ------------------------------------------------------------------ checkpoints


def _without_g_idx(name: str, out: Path, tokenizer_dir: Path) -> Path:
    from safetensors.torch import load_file, save_file

    path = materialize(name, out, tokenizer_dir)
    ckpt = load_file(str(path / "model.safetensors"))
    save_file(
        {k: v for k, v in ckpt.items() if not k.endswith(".g_idx")}, str(path / "model.safetensors")
    )
    return path


def test_g_idx_is_optional_without_act_order_only(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    with_g = materialize("gptq-llama-int8-g64", tmp_path / "a", tiny_tokenizer_dir)
    without = _without_g_idx("gptq-llama-int8-g64", tmp_path / "b", tiny_tokenizer_dir)
    outs = []
    for path in (with_g, without):
        model = load_model(EngineConfig(model=str(path), device="cpu", dtype="float32"))
        layer = model.model.layers[0].self_attn.qkv_proj
        x = torch.randn(3, layer.input_size, generator=torch.Generator().manual_seed(0))
        outs.append(layer(x))
    assert torch.equal(outs[0], outs[1])
    actorder = _without_g_idx("gptq-llama-int4-g32-actorder", tmp_path / "c", tiny_tokenizer_dir)
    with pytest.raises(ValueError, match=r"missing weights: .*g_idx"):
        load_model(EngineConfig(model=str(actorder), device="cpu", dtype="float32"))


@pytest.mark.parametrize("name", ["awq-qwen2-int4-g32", "gptq-llama-int4-g32-actorder"])
def test_dummy_weights_of_a_quantized_shape(tmp_path: Path, name: str) -> None:
    path = tmp_path / "m"
    path.mkdir()
    shutil.copyfile(checkpoint_path(name) / "config.json", path / "config.json")
    model = load_model(EngineConfig(model=str(path), device="cpu", load_format="dummy"))
    layer = model.model.layers[1].mlp.down_proj
    assert layer.w_packed.dtype == torch.int32 and layer.w_packed.shape == (256 // 8, 128)
    assert layer(torch.randn(2, 256)).shape == (2, 128)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["bits"] == 4
