"""The ``Attention`` module models call: binds a backend and this layer's KV cache tensor.

``forward_qkv`` takes the fused qkv projection's output and does everything up to the
attention output: optional per-head q/k RMSNorm (Qwen3), rotary, the KV-cache write and the
backend's attention. On CUDA with a backend that accepts pre-written KV, the first three are
one Triton kernel (``kernels/qkv_rope.py``); elsewhere they are the separate layers.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.layers.fused import use_fused
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
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        self.backend: AttentionBackend | None = None
        self.kv_cache: torch.Tensor = torch.empty(0)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q: [T, H, D]; k/v: [T, Hkv, D], or None when already in the KV cache."""
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
        """qkv: [T, (H + 2 Hkv) * D] (q, k, v packed). Returns the attention output [T, H, D]."""
        assert self.backend is not None, "attention backend not bound (ModelRunner does this)"
        if use_fused(qkv) and self.backend.accepts_written_kv:
            from pagedllm.kernels.qkv_rope import qkv_rope_store

            q = qkv_rope_store(
                qkv,
                positions,
                rotary.cos,
                rotary.sin,
                self.kv_cache,
                meta.slot_mapping,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                q_norm.weight if q_norm is not None else None,
                k_norm.weight if k_norm is not None else None,
                q_norm.eps if q_norm is not None else 1e-6,
            )
            return self.backend.forward(q, None, None, self.kv_cache, meta)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if q_norm is not None and k_norm is not None:
            q, k = q_norm(q), k_norm(k)
        q, k = rotary(positions, q, k)
        return self.forward(q, k, v, meta)
