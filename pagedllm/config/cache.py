"""`CacheConfig`: the paged KV cache, its block size, element type, size and prefix caching.

The pool's size in blocks is decided by the worker once the model is loaded
(``worker/kv_pool_size.py``), from the first of ``num_gpu_blocks``, ``kv_cache_memory_bytes``
and ``gpu_memory_utilization`` that applies; this group only holds and checks the settings.
The scheduler reads ``block_size`` and ``enable_prefix_caching`` from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.config.utils import check_at_least, config_error

# ``--kv-cache-dtype`` values, spelled as vLLM spells them. "auto": the model's dtype; "fp8"
# is "fp8_e4m3". An fp8 cache stores ``clamp(x / scale)`` per element (1 byte, so the pool
# holds twice the tokens of bf16 in the same memory) with per-layer K and V scales.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass
class CacheConfig:
    """KV cache: block size, element type, pool size and automatic prefix caching."""

    block_size: int = field(
        default=16, metadata={"help": "tokens per KV-cache block (a power of two)"}
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata={
            "help": "KV-cache element type; auto: the model's dtype; fp8 (= fp8_e4m3) or "
            "fp8_e5m2: one byte per value with per-layer K/V scales from the checkpoint, "
            "else calibrated at start-up",
            "choices": KV_CACHE_DTYPES,
        },
    )
    gpu_memory_utilization: float = field(
        default=0.9,
        metadata={
            "help": "fraction of the GPU's memory the engine may use (weights, activations and "
            "the KV cache, which takes what is left)"
        },
    )
    num_gpu_blocks: int | None = field(
        default=None,
        metadata={
            "help": "KV-cache size in blocks (overrides --kv-cache-memory-bytes and "
            "--gpu-memory-utilization)",
            "default_help": "from the memory settings",
            "flag": "--num-gpu-blocks-override",
        },
    )
    kv_cache_memory_bytes: int | None = field(
        default=None,
        metadata={
            "help": "KV-cache size in bytes (overrides --gpu-memory-utilization)",
            "default_help": "on GPU from --gpu-memory-utilization, on CPU 2 GiB at most",
        },
    )
    enable_prefix_caching: bool = field(
        default=True,
        metadata={"help": "reuse the KV blocks of prompt prefixes seen before"},
    )

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise config_error(f"block_size must be a power of two >= 1, got {self.block_size}.")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise config_error(
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; use one of "
                f"{', '.join(KV_CACHE_DTYPES)}."
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise config_error(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}."
            )
        check_at_least(self, "num_gpu_blocks", 1)
        check_at_least(self, "kv_cache_memory_bytes", 1)
