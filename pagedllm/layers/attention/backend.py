"""The attention-backend interface: per-step metadata, the backend ABC and a name registry.

Model code calls ``Attention`` (``layer.py``), which forwards to whichever backend the runner
chose. A backend turns the scheduler's block tables into its own metadata once per step
(``build_metadata``) and then, per layer, writes the new keys/values into the paged KV cache
and attends over each sequence's cached context plus its new tokens (causal).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """What every backend needs about one step's flattened batch of T new tokens.

    Sequence i owns query rows ``query_start_loc[i]:query_start_loc[i+1]``; its context
    (cached tokens plus new ones) is ``seq_lens[i]`` tokens long, stored in the KV cache blocks
    ``block_tables[i]``. ``slot_mapping[t]`` is where token t's key/value goes
    (``block_id * block_size + offset``).
    """

    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Backend-specific per-step data, filled once per step by ``AttentionBackend.prepare``.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(ABC):
    """Paged attention over a KV cache of shape [2, num_blocks, block_size, Hkv, D] per layer."""

    name: str = ""
    # True if ``forward`` accepts k = v = None: the caller already wrote them into the cache.
    accepts_written_kv: bool = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def prepare(self, meta: AttentionMetadata) -> None:  # noqa: B027  (optional hook)
        """Once per step, before the first layer: derive backend-specific data into ``meta``."""

    @staticmethod
    def write_kv(
        kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Scatter this step's keys/values ([T, Hkv, D]) into their cache slots."""
        _, _, _, hk, d = kv_cache.shape
        kv_cache[0].view(-1, hk, d).index_copy_(0, slot_mapping, k)
        kv_cache[1].view(-1, hk, d).index_copy_(0, slot_mapping, v)

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] (new tokens only; None if already written, see
        ``accepts_written_kv``). Returns [T, H, D]."""


_REGISTRY: dict[str, Callable[..., AttentionBackend]] = {}


def register_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    def wrap(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend_cls(name: str, device: torch.device) -> Callable[..., AttentionBackend]:
    """Resolve ``name`` ("auto" picks the best one registered for ``device``)."""
    from pagedllm.layers.attention import torch_native  # noqa: F401  (registers itself)

    if device.type == "cuda":
        from pagedllm.layers.attention import triton_backend  # noqa: F401
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch_native"
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown attention backend {name!r}; available: {', '.join(available_backends())}."
        )
    return _REGISTRY[name]
