"""The ``Attention`` module models call: binds a backend and this layer's KV cache tensor.

The layer holds no attention logic of its own. It knows its head counts (so models can build
it before any backend exists) and which cache tensor is its own; everything that touches the
cache (its layout, the KV write, the fused q/k-norm + rotary + KV-write kernel on GPU) is the
backend's, so a backend with another cache layout or element type needs no model changes.

The layer also owns its fp8 KV-cache scales, ``kv_scale`` = (k_scale, v_scale): one ``[2]``
float32 tensor on the model's device, handed to the backend on every call and only ever
updated in place (``set_kv_scale``), so a CUDA graph captured once keeps reading the current
values. They stay 1.0, and unused, with a cache in the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers.attention.backend import AttentionBackend
from pagedllm.layers.attention.kv_quant import new_kv_scale
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
        # Not a buffer: neither a checkpoint tensor nor cast by ``model.to(dtype)``.
        self.kv_scale: torch.Tensor = new_kv_scale()  # on the device the model is built on
        self.kv_scale_source = "default"  # or "checkpoint", "calibrated"

    def set_kv_scale(
        self, k_scale: float | torch.Tensor, v_scale: float | torch.Tensor, source: str
    ) -> None:
        """Set (k_scale, v_scale) in place; each must be a positive finite scalar."""
        values = [float(k_scale), float(v_scale)]
        for name, x in zip(("k_scale", "v_scale"), values, strict=True):
            if not 0.0 < x < float("inf"):
                raise ValueError(f"{name} must be a positive finite number, got {x}.")
        self.kv_scale.copy_(torch.tensor(values, dtype=torch.float32))
        self.kv_scale_source = source

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, H, D]; k/v: [T, Hkv, D] of the new tokens, which the backend caches."""
        assert self.backend is not None, "attention backend not bound (ModelRunner does this)"
        return self.backend.forward(q, k, v, self.kv_cache, meta, self.kv_scale)

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
        return self.backend.forward_qkv(
            qkv, positions, rotary, q_norm, k_norm, self.kv_cache, meta, self.kv_scale
        )
