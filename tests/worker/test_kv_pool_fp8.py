"""The KV pool with an fp8 cache: twice the blocks for the same bytes, start-up calibration of
the scales from the profiling step, the 1.0 fallback (logged), and the block count reduced to
its minimum over tensor-parallel ranks (two gloo ranks)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_spec import KVCacheSpec
from pagedllm.layers.attention.layer import Attention
from pagedllm.worker.kv_pool_size import (
    calibrate_kv_scales,
    determine_num_blocks,
    min_over_tp_ranks,
    run_profile_step,
)
from pagedllm.worker.model_runner import ModelRunner
from tests.distributed.tp_harness import spawn_ranks


def test_same_bytes_twice_the_blocks(llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    counts = {}
    for kv in ("auto", "fp8", "fp8_e5m2"):
        cfg = EngineConfig(
            model=str(llama_dir), device="cpu", dtype="bfloat16", kv_cache_dtype=kv,
            kv_cache_memory_bytes=3 << 20,
        )  # fmt: skip
        spec = KVCacheSpec.from_config(cfg)
        arch = cfg.model_config.arch
        layers = [Attention(arch.num_attention_heads, spec.num_kv_heads, spec.head_dim, 1.0)]
        with caplog.at_level(logging.INFO, logger="pagedllm.worker.kv_pool_size"):
            counts[kv] = determine_num_blocks(cfg, spec, SimpleNamespace(attn_layers=layers))  # type: ignore[arg-type]
    assert counts["fp8"] == counts["fp8_e5m2"] == 2 * counts["auto"] > 0
    assert "no profiling pass ran" in caplog.text and "k_scale = v_scale = 1.0" in caplog.text


def test_profile_step_calibrates_scales(llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The profiling step's K/V (random tokens, a cache of the model's dtype) set each layer's
    scales to amax / 448; without it (CPU) they stay 1.0 and a log line says so."""
    cfg = EngineConfig(
        model=str(llama_dir), device="cpu", kv_cache_dtype="fp8", max_num_batched_tokens=64,
        max_model_len=48, num_gpu_blocks=8,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="pagedllm.worker.kv_pool_size"):
        runner = ModelRunner(cfg)
    assert "no profiling pass ran" in caplog.text
    assert all(a.kv_scale.tolist() == [1.0, 1.0] for a in runner.attn_layers)
    assert runner.kv_caches[0].dtype == torch.float8_e4m3fn
    profile_spec = dataclasses.replace(runner.kv_spec, dtype="float32")
    caches = run_profile_step(cfg, profile_spec, runner)
    assert len(caches) == len(runner.attn_layers) and caches[0].dtype == torch.float32
    calibrate_kv_scales(runner.attn_layers, caches, runner.kv_spec.dtype)
    for layer, cache in zip(runner.attn_layers, caches, strict=True):
        amax = cache.flatten(1).abs().amax(1)
        assert (amax > 0).all()
        assert layer.kv_scale_source == "calibrated"
        assert torch.allclose(layer.kv_scale, amax / 448.0)
    # Checkpoint scales are kept.
    first = runner.attn_layers[0]
    first.set_kv_scale(0.125, 0.25, "checkpoint")
    calibrate_kv_scales(runner.attn_layers, caches, runner.kv_spec.dtype)
    assert first.kv_scale.tolist() == [0.125, 0.25]


def _rank_min(rank: int, world_size: int) -> None:
    assert min_over_tp_ranks(100 - 30 * rank, torch.device("cpu")) == 100 - 30 * (world_size - 1)


def test_blocks_are_the_minimum_over_ranks(tmp_path: Path) -> None:
    assert min_over_tp_ranks(7, torch.device("cpu")) == 7  # one rank: itself
    spawn_ranks(_rank_min, 2, tmp_path)
