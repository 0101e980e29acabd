"""`EngineConfig`: every engine setting in one dataclass, validated once and passed down."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo-model"

SCHEDULING_POLICIES = ("fcfs", "priority")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass
class ModelConfig:
    """The architecture numbers read from a Hugging Face ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    hf_dtype: torch.dtype | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_dir(cls, path: Path) -> ModelConfig:
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"Model directory {path} has no config.json.")
        raw = json.loads(cfg_file.read_text())
        archs = raw.get("architectures") or []
        if not archs:
            raise ValueError(f"{cfg_file} lists no 'architectures'.")
        heads = raw["num_attention_heads"]
        rope_params = raw.get("rope_parameters") or {}
        rope_scaling = raw.get("rope_scaling") or None
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        theta = raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        dtype_name = raw.get("torch_dtype") or raw.get("dtype")
        return cls(
            architecture=archs[0],
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            sliding_window=raw.get("sliding_window")
            if raw.get("use_sliding_window", True)
            else None,
            hf_dtype=_DTYPES.get(str(dtype_name)) if dtype_name else None,
            raw=raw,
        )


@dataclass
class EngineConfig:
    """All engine settings. Spelled like vLLM's ``EngineArgs``; validated in ``__post_init__``."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    kv_cache_dtype: str = "auto"  # auto = the model's dtype (fp8 is not supported yet)
    device: str = "auto"  # auto | cpu | cuda
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 256
    # "fcfs": arrival order, requests with priority != 0 are rejected; "priority": lower
    # priority value first, then arrival (as vLLM's --scheduling-policy).
    scheduling_policy: str = "fcfs"
    max_num_batched_tokens: int | None = None
    num_gpu_blocks: int | None = None  # KV pool size in blocks (overrides the two below)
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    load_format: str = "auto"  # auto | safetensors | dummy
    attention_backend: str = "auto"
    enforce_eager: bool = False
    # Prepare step N+1 on the CPU while step N runs (default: on for CUDA, off for CPU).
    async_scheduling: bool | None = None
    # Derived during validation:
    model_config: ModelConfig = field(init=False, repr=False)
    torch_dtype: torch.dtype = field(init=False)
    torch_device: torch.device = field(init=False)

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = str(DEMO_MODEL_DIR)
        path = Path(os.path.expanduser(self.model))
        if not path.is_dir():
            raise ValueError(
                f"Model {self.model!r} is not a local directory. pagedllm loads Hugging Face "
                "model directories from disk (config.json, *.safetensors, tokenizer files)."
            )
        self.model = str(path)
        if self.tokenizer is None:
            self.tokenizer = self.model
        self.model_config = ModelConfig.from_dir(path)
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"Invalid EngineConfig: {msg}")

        if self.device == "auto":
            self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        elif self.device in ("cpu", "cuda"):
            if self.device == "cuda" and not torch.cuda.is_available():
                raise bad("device='cuda' but no CUDA GPU is available.")
            self.torch_device = torch.device(self.device)
        else:
            raise bad(f"device must be one of auto, cpu, cuda; got {self.device!r}.")

        if self.dtype == "auto":
            hf = self.model_config.hf_dtype
            if self.torch_device.type == "cpu":
                self.torch_dtype = torch.float32
            else:
                self.torch_dtype = torch.bfloat16 if hf in (None, torch.float32) else hf
        elif self.dtype in _DTYPES:
            self.torch_dtype = _DTYPES[self.dtype]
        else:
            raise bad(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}.")

        if self.async_scheduling is None:
            self.async_scheduling = self.torch_device.type == "cuda"
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise bad(f"block_size must be a power of two >= 1, got {self.block_size}.")
        limit = self.model_config.max_position_embeddings
        if self.model_config.sliding_window:  # no sliding-window attention: stay inside it
            limit = min(limit, self.model_config.sliding_window)
        if self.max_model_len is None:
            self.max_model_len = limit
        elif not 1 <= self.max_model_len <= limit:
            raise bad(
                f"max_model_len must be in [1, {limit}] (the model's context limit), "
                f"got {self.max_model_len}."
            )
        if self.max_num_seqs < 1:
            raise bad(f"max_num_seqs must be >= 1, got {self.max_num_seqs}.")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise bad(
                f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}; "
                f"got {self.scheduling_policy!r}."
            )
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = (
                max(2048, self.max_num_seqs)
                if self.enable_chunked_prefill
                else max(self.max_model_len, self.max_num_seqs)
            )
        if self.max_num_batched_tokens < 1:
            raise bad(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}.")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise bad(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is disabled."
            )
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise bad(f"num_gpu_blocks must be >= 1, got {self.num_gpu_blocks}.")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise bad(f"kv_cache_memory_bytes must be >= 1, got {self.kv_cache_memory_bytes}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise bad(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}."
            )
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise bad(f"load_format must be auto, safetensors or dummy; got {self.load_format!r}.")
        if self.kv_cache_dtype != "auto":
            raise bad(f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported yet; use 'auto'.")
