"""The attention-backend interface: KV-cache ownership, per-step metadata, and a name registry.

Model code calls ``Attention`` (``layer.py``), which forwards to whichever backend the runner
chose. The backend is the only code that knows the KV cache's layout: it says what shape the
per-layer cache tensors have and allocates them (``kv_cache_shape`` / ``allocate_kv_cache``),
it alone writes new keys/values into them (``write_kv``, or a fused kernel inside
``forward_qkv``), and it reads them back when attending. Keeping all three in one place is what
lets a backend change the layout or the element type without touching the models, the layer
or the runner. An fp8 cache (``kv_quant.py``) is told by the cache tensor's dtype; its
per-layer (k, v) scales come with every call as ``kv_scale`` (a ``[2]`` float32 tensor the
``Attention`` layer owns), used when writing (``x / scale``) and when reading (``* scale``).

Per step, ``build_metadata`` turns the runner's shared ``AttentionMetadata`` into the backend's
own typed subclass; per layer, ``forward_qkv`` goes from the fused qkv projection to the
attention output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from pagedllm.layers.attention.kv_quant import FP8_TORCH_DTYPES, is_fp8, quantize_kv
from pagedllm.layers.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from pagedllm.core.kv_cache_spec import KVCacheSpec
    from pagedllm.layers.norm import RMSNorm
    from pagedllm.layers.rotary import RotaryEmbedding

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "available_backends",
    "get_backend_cls",
    "kv_torch_dtype",
    "register_backend",
]

# KV dtype names (``KVCacheSpec.dtype``) the backends can store.
_KV_TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    **FP8_TORCH_DTYPES,
}


def kv_torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of the KV-cache dtype name ``name``."""
    if name not in _KV_TORCH_DTYPES:
        raise ValueError(f"KV cache dtype {name!r} is not supported yet by the attention backends.")
    return _KV_TORCH_DTYPES[name]


class AttentionBackend(ABC):
    """Paged attention over per-layer KV caches of shape [2, num_blocks, block_size, Hkv, D].

    Subclasses implement ``build_metadata`` and ``attend``; they may override ``forward_qkv``
    to fuse the q/k normalisation, rotary and KV write into one kernel, and the layout
    methods to store the cache differently.
    """

    name: str = ""
    # True if ``attend`` for a decode-only step reads nothing from the host that changes between
    # steps, so the runner may capture it (with ``build_metadata``'s result) in a CUDA graph.
    supports_cuda_graphs: bool = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    # ---- the KV cache: layout, allocation, writes ----

    def kv_cache_shape(self, num_blocks: int, spec: KVCacheSpec) -> tuple[int, ...]:
        """Shape of one layer's cache tensor holding ``num_blocks`` blocks."""
        return (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)

    def allocate_kv_cache(
        self, num_blocks: int, spec: KVCacheSpec, device: torch.device
    ) -> list[torch.Tensor]:
        """One zeroed cache tensor per layer, ``spec.bytes_per_block * num_blocks`` in all."""
        if (spec.num_kv_heads, spec.head_dim) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"KV cache spec ({spec.num_kv_heads} heads x {spec.head_dim}) does not match the "
                f"attention layers ({self.num_kv_heads} heads x {self.head_dim})."
            )
        shape = self.kv_cache_shape(num_blocks, spec)
        dtype = kv_torch_dtype(spec.dtype)
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.num_layers)]

    def write_kv(
        self,
        kv_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scale: torch.Tensor | None = None,
    ) -> None:
        """Scatter this step's keys/values ([T, Hkv, D]) into their cache slots.

        An fp8 cache stores ``clamp(x / scale)`` with ``kv_scale`` = (k_scale, v_scale).
        """
        _, _, _, hk, d = kv_cache.shape
        if is_fp8(kv_cache.dtype):
            if kv_scale is None:
                raise ValueError("An fp8 KV cache needs the layer's kv_scale to write into it.")
            # index_copy_ has no fp8 kernels: scatter the bytes.
            k = quantize_kv(k, kv_scale[0], kv_cache.dtype).view(torch.uint8)
            v = quantize_kv(v, kv_scale[1], kv_cache.dtype).view(torch.uint8)
            kv_cache = kv_cache.view(torch.uint8)
        kv_cache[0].view(-1, hk, d).index_copy_(0, slot_mapping, k)
        kv_cache[1].view(-1, hk, d).index_copy_(0, slot_mapping, v)

    # ---- per step ----

    @abstractmethod
    def build_metadata(self, common: AttentionMetadata) -> AttentionMetadata:
        """Once per step, before the first layer: this backend's metadata subclass."""

    # ---- per layer ----

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, H, D], whose keys/values are already in ``kv_cache``. Returns [T, H, D].

        An fp8 cache is read as ``float(x) * scale`` with ``kv_scale`` = (k_scale, v_scale).
        """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write k/v ([T, Hkv, D], new tokens only) to the cache, then attend with q [T, H, D]."""
        self.write_kv(kv_cache, k, v, meta.slot_mapping, kv_scale)
        return self.attend(q, kv_cache, meta, kv_scale)

    def forward_qkv(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        q_norm: RMSNorm | None,
        k_norm: RMSNorm | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """qkv: [T, (H + 2 Hkv) * D] (q, k, v packed): optional per-head q/k RMSNorm (Qwen3),
        rotary, KV write, attention. Returns [T, H, D]. This default runs them as separate ops.
        """
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if q_norm is not None and k_norm is not None:
            q, k = q_norm(q), k_norm(k)
        q, k = rotary(positions, q, k)
        return self.forward(q, k, v, kv_cache, meta, kv_scale)


_REGISTRY: dict[str, type[AttentionBackend]] = {}


def register_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    def wrap(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend_cls(name: str, device: torch.device) -> type[AttentionBackend]:
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
