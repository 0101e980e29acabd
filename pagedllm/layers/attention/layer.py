"""The ``Attention`` module models call: binds a backend and this layer's KV cache tensor.

The layer holds no attention logic of its own. It knows its head counts (so models can build
it before any backend exists) and which cache tensor is its own; everything that touches the
cache (its layout, the KV write, the fused q/k-norm + rotary + KV-write kernel on GPU) is the
backend's, so a backend with another cache layout or element type needs no model changes.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers.attention.backend import AttentionBackend
from pagedllm.layers.attention.metadata import AttentionMetadata
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    """Delegates to the runner-selected backend; ``kv_cache`` and ``backend`` are bound later."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend: AttentionBackend | None = None
        self.kv_cache: torch.Tensor = torch.empty(0)  # the backend allocates, the runner binds

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, H, D]; k/v: [T, Hkv, D] of the new tokens, which the backend caches."""
        assert self.backend is not None, "attention backend not bound (ModelRunner does this)"
        return self.backend.forward(q, k, v, self.kv_cache, meta)

    def forward_qkv(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        q_norm: RMSNorm | None,
        k_norm: RMSNorm | None,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """qkv: [T, (H + 2 Hkv) * D] (q, k, v packed). Returns the attention output [T, H, D].

        Optional per-head q/k RMSNorm (Qwen3), rotary, the KV-cache write and attention, in
        whatever kernels the backend chooses.
        """
        assert self.backend is not None, "attention backend not bound (ModelRunner does this)"
        return self.backend.forward_qkv(qkv, positions, rotary, q_norm, k_norm, self.kv_cache, meta)
