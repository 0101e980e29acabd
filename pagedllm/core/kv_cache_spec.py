"""`KVCacheSpec`: the shape and size of one rank's paged KV cache, as plain data.

The numbers that size the KV cache (layers, block size, KV heads, head size, element type) used
to be re-derived from the config wherever they were needed, with the weight dtype and the
model's full KV-head count. They now live in one frozen dataclass that the worker builds once
(``pagedllm.worker.kv_cache_spec``) and everything else reads: the pool sizing, the backend's
allocation, the benchmark reports, and later the engine, which receives it from worker
processes. It therefore holds no tensors and this module does not import torch: the dtype is a
name ("bfloat16", "float16", "float32"; "fp8_e4m3" once the fp8 KV cache exists) and the
attention backend maps it to a torch dtype.

``num_kv_heads`` is per tensor-parallel rank: each rank stores only its share of the heads, and
when there are fewer KV heads than ranks every rank keeps a replica of one head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

# Bytes per element of every KV-cache dtype name a spec may carry.
KV_DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "fp8_e4m3": 1,
}

# ``CacheConfig.kv_cache_dtype`` values that work today ("auto": the model's dtype).
SUPPORTED_KV_CACHE_DTYPES = ("auto",)


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: str) -> str:
    """The KV dtype name for a ``kv_cache_dtype`` setting and the model's activation dtype."""
    if kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r} is not supported yet; "
            f"use one of {', '.join(SUPPORTED_KV_CACHE_DTYPES)} (the model's dtype)."
        )
    if model_dtype not in KV_DTYPE_BYTES:
        raise ValueError(f"No KV cache for model dtype {model_dtype!r}.")
    return model_dtype


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
