"""The ``Attention`` module models call: binds a backend and this layer's KV cache tensor."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers.attention.backend import AttentionBackend, AttentionMetadata


class Attention(nn.Module):
    """Delegates to the runner-selected backend; ``kv_cache`` and ``backend`` are bound later."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend: AttentionBackend | None = None
        self.kv_cache: torch.Tensor = torch.empty(0)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        assert self.backend is not None, "attention backend not bound (ModelRunner does this)"
        return self.backend.forward(q, k, v, self.kv_cache, meta)
