"""KVCacheSpec: its numbers for real model shapes, tensor-parallel head splits, and that the
bytes it reports are the bytes the backend allocates and the pool sizing budgets with."""

from __future__ import annotations

import pickle
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import torch

import pagedllm
from pagedllm.config import EngineConfig
from pagedllm.core import kv_cache_spec as core_spec
from pagedllm.core.kv_cache_spec import KVCacheSpec, kv_heads_per_rank
from pagedllm.layers.attention.torch_native import TorchNativeBackend
from pagedllm.worker.kv_cache_spec import build_kv_cache_spec
from pagedllm.worker.model_runner import ModelRunner

PRESETS = Path(pagedllm.__file__).parent / "bench" / "presets"


def _preset(name: str, **kw: object) -> EngineConfig:
    return EngineConfig(model=str(PRESETS / name), device="cpu", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "preset,dtype,tp,heads,per_token",
    [
        # layers x 2 (K, V) x heads x head_dim x bytes
        ("llama-3-8b", "bfloat16", 1, 8, 32 * 2 * 8 * 128 * 2),  # GQA 32/8: 128 KiB a token
        ("llama-3-8b", "float32", 1, 8, 32 * 2 * 8 * 128 * 4),
        ("llama-3-8b", "float16", 2, 4, 32 * 2 * 4 * 128 * 2),  # tp 2 halves the heads
        ("llama-3-8b", "bfloat16", 16, 1, 32 * 2 * 1 * 128 * 2),  # 8 heads on 16 ranks
        ("qwen2.5-7b", "bfloat16", 1, 4, 28 * 2 * 4 * 128 * 2),  # head_dim from hidden/heads
        ("qwen2.5-7b", "bfloat16", 8, 1, 28 * 2 * 1 * 128 * 2),
        ("qwen3-0.6b", "bfloat16", 4, 2, 28 * 2 * 2 * 128 * 2),
    ],
)
def test_spec_numbers(preset, dtype, tp, heads, per_token) -> None:  # type: ignore[no-untyped-def]
    cfg = _preset(preset, dtype=dtype, block_size=32)
    for rank in range(tp):
        spec = KVCacheSpec.from_config(cfg, tp_rank=rank, tp_size=tp)
        assert spec.num_kv_heads == heads and spec.dtype == dtype
        assert spec.num_layers == cfg.model_config.arch.num_hidden_layers and spec.block_size == 32
        assert spec.bytes_per_token == per_token
        assert spec.bytes_per_block == per_token * 32


def test_kv_heads_per_rank() -> None:
    assert [kv_heads_per_rank(8, tp) for tp in (1, 2, 4, 8, 16, 32)] == [8, 4, 2, 1, 1, 1]
    assert kv_heads_per_rank(1, 4) == 1  # MQA: every rank keeps the one head
    with pytest.raises(ValueError, match="split evenly"):
        kv_heads_per_rank(8, 3)
    with pytest.raises(ValueError, match="replicated"):
        kv_heads_per_rank(4, 6)
    with pytest.raises(ValueError, match="tp_size"):
        kv_heads_per_rank(4, 0)
    with pytest.raises(ValueError, match="tp_rank"):
        KVCacheSpec.from_config(_preset("llama-3-8b"), tp_rank=2, tp_size=2)


def test_spec_is_plain_frozen_data() -> None:
    spec = KVCacheSpec(num_layers=2, block_size=16, num_kv_heads=4, head_dim=64, dtype="float16")
    assert pickle.loads(pickle.dumps(spec)) == spec
    with pytest.raises(FrozenInstanceError):
        spec.block_size = 8  # type: ignore[misc]
    fp8 = KVCacheSpec(2, 16, 4, 64, "fp8_e4m3")  # sized already; allocation comes later
    assert fp8.bytes_per_block * 2 == spec.bytes_per_block
    with pytest.raises(ValueError, match="Unknown KV cache dtype"):
        KVCacheSpec(2, 16, 4, 64, "int4")
    with pytest.raises(ValueError, match="num_kv_heads"):
        KVCacheSpec(2, 16, 0, 64, "float16")


def test_core_spec_module_does_not_import_torch() -> None:
    """The engine reads specs without torch: load the module alone in a fresh interpreter."""
    code = (
        "import importlib.util, sys\n"
        f"s = importlib.util.spec_from_file_location('kvs', {core_spec.__file__!r})\n"
        "m = importlib.util.module_from_spec(s); sys.modules['kvs'] = m\n"
        "s.loader.exec_module(m)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(m.KVCacheSpec(2, 16, 4, 64, 'bfloat16').bytes_per_block)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(2 * 16 * 4 * 64 * 2 * 2)


@pytest.mark.parametrize(
    "setting,model_dtype,name",
    [
        ("auto", "bfloat16", "bfloat16"),
        ("auto", "float32", "float32"),
        ("fp8", "bfloat16", "fp8_e4m3"),
        ("fp8_e4m3", "float16", "fp8_e4m3"),
        ("fp8_e5m2", "float32", "fp8_e5m2"),
    ],
)
def test_kv_cache_dtype_resolves(setting: str, model_dtype: str, name: str) -> None:
    assert core_spec.resolve_kv_cache_dtype(setting, model_dtype) == name


def test_kv_cache_dtype_errors(llama_dir) -> None:  # type: ignore[no-untyped-def]
    accepted = "auto, fp8, fp8_e4m3, fp8_e5m2"
    with pytest.raises(
        ValueError, match=f"kv_cache_dtype='int8' is not supported; use one of {accepted}"
    ):
        EngineConfig(model=str(llama_dir), device="cpu", kv_cache_dtype="int8")
    with pytest.raises(
        ValueError, match=f"kv_cache_dtype='fp8_e4m3fn' is not supported; use one of {accepted}"
    ):
        core_spec.resolve_kv_cache_dtype("fp8_e4m3fn", "bfloat16")
    with pytest.raises(ValueError, match="No KV cache for model dtype 'fp8_e4m3'"):
        core_spec.resolve_kv_cache_dtype("auto", "fp8_e4m3")


@pytest.mark.parametrize(
    "setting,torch_dtype", [("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)]
)
def test_fp8_spec_halves_block_bytes(llama_dir, setting, torch_dtype) -> None:  # type: ignore[no-untyped-def]
    """Same model, same memory: an fp8 block is half a bf16 block, so the pool holds twice the
    tokens, and the backend allocates exactly the spec's bytes in the fp8 dtype."""
    cfg = EngineConfig(model=str(llama_dir), device="cpu", dtype="bfloat16")
    fp8_cfg = EngineConfig(
        model=str(llama_dir), device="cpu", dtype="bfloat16", kv_cache_dtype=setting
    )
    bf16, fp8 = KVCacheSpec.from_config(cfg), KVCacheSpec.from_config(fp8_cfg)
    assert fp8.is_fp8 and not bf16.is_fp8 and fp8.element_size == 1
    assert 2 * fp8.bytes_per_block == bf16.bytes_per_block
    budget = 64 * bf16.bytes_per_block
    assert budget // fp8.bytes_per_block == 2 * (budget // bf16.bytes_per_block)
    heads = cfg.model_config.arch.num_attention_heads
    backend = TorchNativeBackend(heads, fp8.num_kv_heads, fp8.head_dim, 1.0)
    caches = backend.allocate_kv_cache(3, fp8, torch.device("cpu"))
    assert len(caches) == fp8.num_layers
    assert all(c.dtype == torch_dtype for c in caches)
    assert sum(c.numel() * c.element_size() for c in caches) == 3 * fp8.bytes_per_block


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_allocation_matches_spec(llama_dir, dtype) -> None:  # type: ignore[no-untyped-def]
    cfg = EngineConfig(model=str(llama_dir), device="cpu", dtype=dtype, num_gpu_blocks=7)
    runner = ModelRunner(cfg)
    spec = runner.kv_spec
    mc = cfg.model_config.arch
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == (
        mc.num_hidden_layers,
        mc.num_key_value_heads,
        mc.head_dim,
        dtype,
    )
    assert len(runner.kv_caches) == spec.num_layers
    allocated = sum(t.numel() * t.element_size() for t in runner.kv_caches)
    assert allocated == (runner.num_blocks + 1) * spec.bytes_per_block  # + the scratch block
    for layer, cache in zip(runner.attn_layers, runner.kv_caches, strict=True):
        assert layer.kv_cache is cache and cache.dtype == getattr(torch, dtype)
        assert cache.shape == runner.backend.kv_cache_shape(runner.num_blocks + 1, spec)


def test_pool_size_uses_spec_bytes(llama_dir) -> None:  # type: ignore[no-untyped-def]
    per_block = KVCacheSpec.from_config(EngineConfig(model=str(llama_dir), device="cpu"))
    budget = 5 * per_block.bytes_per_block + per_block.bytes_per_block // 2
    runner = ModelRunner(
        EngineConfig(model=str(llama_dir), device="cpu", kv_cache_memory_bytes=budget)
    )
    assert runner.num_blocks == 5
    with pytest.raises(ValueError, match="less than one KV block"):
        ModelRunner(EngineConfig(model=str(llama_dir), device="cpu", kv_cache_memory_bytes=10))


def test_spec_checked_against_model_layers(llama_dir) -> None:  # type: ignore[no-untyped-def]
    cfg = EngineConfig(model=str(llama_dir), device="cpu", num_gpu_blocks=2)
    runner = ModelRunner(cfg)
    assert build_kv_cache_spec(cfg, runner.attn_layers) == runner.kv_spec
    with pytest.raises(ValueError, match="do not match"):
        build_kv_cache_spec(cfg, runner.attn_layers[:-1])
    with pytest.raises(ValueError, match="do not match"):  # layers built for one rank, spec for 2
        build_kv_cache_spec(cfg, runner.attn_layers, tp_rank=0, tp_size=2)
