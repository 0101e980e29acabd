"""`EngineConfig`: flat keywords routed to their groups, defaults, validation, resolution."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

from pagedllm.config import (
    DEMO_MODEL_DIR,
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ParallelConfig,
    SchedulerConfig,
)
from pagedllm.config.engine import CONFIG_GROUPS, FIELD_OWNERS
from pagedllm.config.model import resolve_torch_dtype
from pagedllm.config.scheduler import DEFAULT_MAX_NUM_BATCHED_TOKENS

# Every flat keyword: (the group it belongs to, a valid value; not the default where one exists).
FLAT_VALUES: dict[str, tuple[str, Any]] = {
    "tokenizer": ("model_config", str(DEMO_MODEL_DIR)),  # a directory: anything else is a hub id
    "dtype": ("model_config", "bfloat16"),
    "max_model_len": ("model_config", 100),
    "seed": ("model_config", 7),
    "load_format": ("model_config", "dummy"),
    "download_dir": ("load_config", "/nonexistent/hf-cache"),  # read only for hub ids
    "hf_token": ("load_config", "hf_test_token"),
    "trust_remote_code": ("load_config", True),
    "block_size": ("cache_config", 32),
    "kv_cache_dtype": ("cache_config", "fp8"),
    "gpu_memory_utilization": ("cache_config", 0.5),
    "num_gpu_blocks": ("cache_config", 9),
    "kv_cache_memory_bytes": ("cache_config", 1 << 20),
    "enable_prefix_caching": ("cache_config", False),
    "max_num_seqs": ("scheduler_config", 7),
    "max_num_batched_tokens": ("scheduler_config", 333),
    "max_num_encoder_tokens": ("scheduler_config", 99),
    "limit_mm_per_prompt": ("scheduler_config", '{"image": 3}'),
    "allowed_local_media_path": ("scheduler_config", "/nonexistent/media"),
    "scheduling_policy": ("scheduler_config", "priority"),
    "enable_chunked_prefill": ("scheduler_config", False),
    "async_scheduling": ("scheduler_config", True),
    "device": ("device_config", "cpu"),
    "attention_backend": ("device_config", "torch_native"),
    "enforce_eager": ("device_config", True),
    "tensor_parallel_size": ("parallel_config", 1),
    "data_parallel_size": ("parallel_config", 1),
    "distributed_executor_backend": ("parallel_config", "mp"),
}


# Hub revisions apply to hub ids only (tests/config/test_hub.py); to_kwargs() gives them as None.
HUB_ONLY = {"revision", "tokenizer_revision"}
# Keywords with no other valid value for a plain checkpoint (tested where they apply).
NEED_A_CHECKPOINT = {"quantization"}  # must agree with a quantized checkpoint


def test_the_table_names_every_flat_keyword() -> None:
    assert set(FLAT_VALUES) | {"model"} | HUB_ONLY | NEED_A_CHECKPOINT == set(FIELD_OWNERS)


@pytest.mark.parametrize("name", sorted(FLAT_VALUES))
def test_every_flat_kwarg_lands_in_its_group(name: str, arch_dir: str) -> None:
    group, value = FLAT_VALUES[name]
    kw: dict[str, Any] = {"model": arch_dir, "device": "cpu", name: value}
    if name == "enable_chunked_prefill":
        kw["max_num_batched_tokens"] = 256  # must hold a whole max_model_len prompt then
    cfg = EngineConfig(**kw)
    assert getattr(getattr(cfg, group), name) == value
    others = [attr for attr in CONFIG_GROUPS if attr != group]
    assert not any(hasattr(getattr(cfg, attr), name) for attr in others)
    assert not hasattr(cfg, name)  # no flat shortcuts: one path per setting
    assert cfg.model_config.model == arch_dir


def test_all_keywords_at_once_and_back(arch_dir: str) -> None:
    kw = {name: value for name, (_, value) in FLAT_VALUES.items()}
    cfg = EngineConfig(model=arch_dir, **kw)
    unset = dict.fromkeys(HUB_ONLY | NEED_A_CHECKPOINT)
    assert cfg.to_kwargs() == {"model": arch_dir, **kw, **unset}
    assert EngineConfig(**cfg.to_kwargs()) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # it travels to the engine process


@pytest.mark.parametrize("bad", ["max_num_seq", "model_config", "torch_dtype", "arch"])
def test_unknown_keyword_is_a_type_error_naming_it(bad: str, arch_dir: str) -> None:
    with pytest.raises(TypeError, match=f"unexpected keyword argument.*'{bad}'"):
        EngineConfig(model=arch_dir, **{bad: 1})


def test_defaults(arch_dir: str) -> None:
    cfg = EngineConfig(model=arch_dir, device="cpu")
    mc, cache, sched = cfg.model_config, cfg.cache_config, cfg.scheduler_config
    assert (mc.tokenizer, mc.dtype, mc.max_model_len, mc.seed, mc.load_format) == (
        arch_dir,
        "auto",
        256,  # the model's max_position_embeddings
        0,
        "auto",
    )
    assert mc.torch_dtype == torch.float32 and mc.arch.num_hidden_layers == 2
    assert cache == CacheConfig(16, "auto", 0.9, None, None, True)
    assert sched == SchedulerConfig(256, DEFAULT_MAX_NUM_BATCHED_TOKENS["cpu"], "fcfs", True, False)
    assert DEFAULT_MAX_NUM_BATCHED_TOKENS == {"cuda": 8192, "cpu": 2048}
    assert cfg.device_config == DeviceConfig("cpu", "auto", False)
    assert cfg.device_config.torch_device == torch.device("cpu")
    assert cfg.parallel_config == ParallelConfig(1, 1)
    assert EngineConfig().model_config.model == str(DEMO_MODEL_DIR)


@pytest.mark.parametrize(
    "kw,max_tokens",
    [
        ({}, 2048),
        ({"max_num_seqs": 4096}, 4096),  # every running sequence decodes each step
        ({"enable_chunked_prefill": False}, 256),  # a whole max_model_len prompt per step
        ({"enable_chunked_prefill": False, "max_num_seqs": 300}, 300),
        ({"enable_chunked_prefill": False, "max_model_len": 100, "max_num_seqs": 8}, 100),
        ({"max_num_batched_tokens": 5}, 5),
    ],
)
def test_max_num_batched_tokens_default(kw: dict[str, Any], max_tokens: int, arch_dir: str) -> None:
    cfg = EngineConfig(model=arch_dir, device="cpu", **kw)
    assert cfg.scheduler_config.max_num_batched_tokens == max_tokens


def test_max_model_len_from_the_architecture(make_arch_dir: Callable[..., str]) -> None:
    windowed = make_arch_dir(sliding_window=128)
    assert EngineConfig(model=windowed, device="cpu").model_config.max_model_len == 128
    unused = make_arch_dir(sliding_window=128, use_sliding_window=False)
    assert EngineConfig(model=unused, device="cpu").model_config.max_model_len == 256
    with pytest.raises(ValueError, match=r"max_model_len must be in \[1, 128\]"):
        EngineConfig(model=windowed, max_model_len=129)


def test_dtype_resolution(make_arch_dir: Callable[..., str]) -> None:
    f16 = make_arch_dir(torch_dtype="float16")
    assert EngineConfig(model=f16, device="cpu").model_config.arch.hf_dtype == torch.float16
    assert EngineConfig(model=f16, device="cpu").model_config.torch_dtype == torch.float32
    assert EngineConfig(model=f16, device="cpu", dtype="half").model_config.torch_dtype == (
        torch.float16
    )
    assert resolve_torch_dtype("auto", torch.float16, "cuda") == torch.float16
    assert resolve_torch_dtype("auto", torch.float32, "cuda") == torch.bfloat16
    assert resolve_torch_dtype("auto", None, "cuda") == torch.bfloat16
    assert resolve_torch_dtype("float", None, "cuda") == torch.float32


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"max_model_len": 10**7}, r"max_model_len must be in \[1, 256\] \(the model's context"),
        ({"max_model_len": 0}, r"max_model_len must be in \[1, 256\]"),
        ({"block_size": 3}, "block_size must be a power of two >= 1, got 3"),
        ({"block_size": 0}, "block_size must be a power of two >= 1, got 0"),
        ({"dtype": "int3"}, "dtype must be one of auto, float32, float, bfloat16, float16, half"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda; got 'tpu'"),
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization must be in \(0, 1\]"),
        ({"gpu_memory_utilization": 0.0}, r"gpu_memory_utilization must be in \(0, 1\]"),
        ({"scheduling_policy": "lifo"}, "scheduling_policy must be one of fcfs, priority; got"),
        ({"max_num_seqs": 0}, "max_num_seqs must be >= 1, got 0"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be >= 1, got 0"),
        (
            {"enable_chunked_prefill": False, "max_num_batched_tokens": 100},
            r"max_num_batched_tokens \(100\) must be >= max_model_len \(256\) when chunked",
        ),
        ({"num_gpu_blocks": 0}, "num_gpu_blocks must be >= 1, got 0"),
        ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes must be >= 1, got 0"),
        ({"load_format": "pickle"}, "load_format must be one of auto, safetensors, dummy"),
        (
            {"kv_cache_dtype": "fp8_e4m3fn"},
            "kv_cache_dtype='fp8_e4m3fn' is not supported; use one of auto, fp8, fp8_e4m3, "
            "fp8_e5m2",
        ),
        ({"tensor_parallel_size": 3}, r"tensor_parallel_size=3 does not divide the model's num_"),
        (
            {"tensor_parallel_size": 2, "distributed_executor_backend": "uni"},
            "distributed_executor_backend='uni' runs one rank",
        ),
        ({"distributed_executor_backend": "ray"}, "distributed_executor_backend must be one of"),
        ({"data_parallel_size": 4}, "data_parallel_size=4: data parallelism is a pagedllm serve"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be >= 1, got 0"),
        pytest.param({"device": "cuda"}, "device='cuda' but no CUDA GPU", marks=NO_GPU),
    ],
)
def test_invalid_values(kw: dict[str, Any], needle: str, arch_dir: str) -> None:
    with pytest.raises(ValueError, match=f"^Invalid EngineConfig: {needle}"):
        EngineConfig(model=arch_dir, **kw)


def test_invalid_model_directories(tmp_path: Any, make_arch_dir: Callable[..., str]) -> None:
    with pytest.raises(ValueError, match="is not a local directory"):
        EngineConfig(model=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        EngineConfig(model=str(tmp_path))
    with pytest.raises(ValueError, match="lists no 'architectures'"):
        EngineConfig(model=make_arch_dir(architectures=[]))


def test_groups_check_their_own_fields() -> None:
    """A group built alone validates what it owns (the engine adds only cross-group rules)."""
    with pytest.raises(ValueError, match="block_size"):
        CacheConfig(block_size=12)
    with pytest.raises(ValueError, match="scheduling_policy"):
        SchedulerConfig(scheduling_policy="lifo")
    with pytest.raises(ValueError, match="a pagedllm serve option"):
        ParallelConfig(data_parallel_size=8)
    assert SchedulerConfig().max_num_batched_tokens is None  # resolved by EngineConfig


def test_importing_the_config_does_not_import_torch() -> None:
    """``pagedllm --help`` and the torch-free ``core/`` import the config; torch stays out."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import pagedllm.config, pagedllm.config.cli_args, pagedllm.core\n"
        "for m in pkgutil.iter_modules(pagedllm.core.__path__):\n"
        "    importlib.import_module('pagedllm.core.' + m.name)\n"
        "from pagedllm.entrypoints.cli import build_parser\n"
        "build_parser()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_default_step_budget_depends_on_the_device() -> None:
    from pagedllm.config.scheduler import default_max_num_batched_tokens

    assert default_max_num_batched_tokens(256, 4096, True, "cuda") == 8192
    assert default_max_num_batched_tokens(256, 4096, True, "cpu") == 2048
    assert default_max_num_batched_tokens(4096, 4096, True, "cpu") == 4096  # >= max_num_seqs
    assert default_max_num_batched_tokens(256, 32768, False, "cuda") == 32768  # whole prompts
