"""`KVCacheSpec`: the shape and size of one rank's paged KV cache, as plain data.

The numbers that size the KV cache (layers, block size, KV heads, head size, element type) used
to be re-derived from the config wherever they were needed, with the weight dtype and the
model's full KV-head count. They now live in one frozen dataclass that the worker builds once
(``pagedllm.worker.kv_cache_spec``) and everything else reads: the pool sizing, the backend's
allocation, the benchmark reports, and later the engine, which receives it from worker
processes. It therefore holds no tensors and this module does not import torch: the dtype is a
name ("bfloat16", "float16", "float32", "fp8_e4m3", "fp8_e5m2") and the attention backend maps
it to a torch dtype. An fp8 spec counts one byte per element, so the same memory holds twice
the tokens of a bf16 cache (the per-layer K/V scales live with the attention layers, not here).

``num_kv_heads`` is per tensor-parallel rank: each rank stores only its share of the heads, and
when there are fewer KV heads than ranks every rank keeps a replica of one head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagedllm.config.cache import KV_CACHE_DTYPES

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

# Bytes per element of every KV-cache dtype name a spec may carry.
KV_DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}

# Spec dtypes stored as scaled fp8 (their K/V scales are per layer).
FP8_KV_DTYPES = ("fp8_e4m3", "fp8_e5m2")

# ``CacheConfig.kv_cache_dtype`` values ("auto": the model's dtype; "fp8": e4m3).
SUPPORTED_KV_CACHE_DTYPES = KV_CACHE_DTYPES


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: str) -> str:
    """The KV dtype name for a ``kv_cache_dtype`` setting and the model's activation dtype."""
    if kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r} is not supported; "
            f"use one of {', '.join(SUPPORTED_KV_CACHE_DTYPES)}."
        )
    if model_dtype not in KV_DTYPE_BYTES or model_dtype in FP8_KV_DTYPES:
        raise ValueError(f"No KV cache for model dtype {model_dtype!r}.")
    if kv_cache_dtype == "auto":
        return model_dtype
    return "fp8_e4m3" if kv_cache_dtype == "fp8" else kv_cache_dtype


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads one of ``tp_size`` ranks stores: an even share, or one replicated head.

    With at least as many heads as ranks the heads are split evenly; with fewer, each head is
    replicated on ``tp_size // num_kv_heads`` ranks, so every rank stores exactly one.
    """
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}.")
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(
                f"{num_kv_heads} KV heads cannot be split evenly over tp_size={tp_size} ranks."
            )
        return num_kv_heads // tp_size
    if tp_size % num_kv_heads:
        raise ValueError(
            f"tp_size={tp_size} is not a multiple of the model's {num_kv_heads} KV heads, "
            "so they cannot be replicated evenly."
        )
    return 1


@dataclass(frozen=True)
class KVCacheSpec:
    """One rank's KV cache: ``num_layers`` tensors of [2, blocks, block_size, heads, head_dim].

    Plain, picklable data (no torch objects), so a worker process can send it to the engine.
    """

    num_layers: int
    block_size: int
    num_kv_heads: int  # per tensor-parallel rank
    head_dim: int
    dtype: str  # a key of KV_DTYPE_BYTES

    def __post_init__(self) -> None:
        if self.dtype not in KV_DTYPE_BYTES:
            raise ValueError(
                f"Unknown KV cache dtype {self.dtype!r}; known: {', '.join(KV_DTYPE_BYTES)}."
            )
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVCacheSpec.{name} must be >= 1, got {getattr(self, name)}.")

    @property
    def is_fp8(self) -> bool:
        """Whether values are stored as scaled fp8 (one byte each)."""
        return self.dtype in FP8_KV_DTYPES

    @property
    def element_size(self) -> int:
        """Bytes per cached value."""
        return KV_DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer, on this rank."""
        return 2 * self.num_kv_heads * self.head_dim * self.element_size * self.num_layers

    @property
    def bytes_per_block(self) -> int:
        """One block of ``block_size`` tokens in every layer, on this rank."""
        return self.bytes_per_token * self.block_size

    @classmethod
    def from_config(cls, config: EngineConfig, tp_rank: int = 0, tp_size: int = 1) -> KVCacheSpec:
        """Rank ``tp_rank``'s spec for ``config``'s model, its KV heads split ``tp_size`` ways.

        Every rank gets the same numbers today; ``tp_rank`` is checked and kept in the
        signature so callers already say which rank they build for.
        """
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}.")
        arch, cache = config.model_config.arch, config.cache_config
        model_dtype = str(config.model_config.torch_dtype).removeprefix("torch.")
        return cls(
            num_layers=arch.num_hidden_layers,
            block_size=cache.block_size,
            num_kv_heads=kv_heads_per_rank(arch.num_key_value_heads, tp_size),
            head_dim=arch.head_dim,
            dtype=resolve_kv_cache_dtype(cache.kv_cache_dtype, model_dtype),
        )
