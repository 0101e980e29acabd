"""The worker's side of the ``KVCacheSpec``: build it from config + model, allocate, bind.

``pagedllm.core.kv_cache_spec`` holds the plain-data spec (no torch); this module is where it
meets the loaded model and the attention backend. The spec is derived from the config for this
rank and then checked against the model's ``Attention`` layers, so a model whose attention
shapes differ from its config (or a tensor-parallel model built for another rank count) fails
at start-up instead of corrupting the cache. The tensors themselves come from the backend,
which alone knows the cache layout; binding also puts each layer's fp8 (k, v) scale tensor on
the cache's device (before any CUDA graph is captured; later updates are in place).
"""

from __future__ import annotations

import torch

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_spec import KVCacheSpec
from pagedllm.layers.attention.backend import AttentionBackend
from pagedllm.layers.attention.layer import Attention


def build_kv_cache_spec(
    config: EngineConfig, attn_layers: list[Attention], tp_rank: int = 0, tp_size: int = 1
) -> KVCacheSpec:
    """Rank ``tp_rank``'s spec, verified against that rank's model ``attn_layers``."""
    spec = KVCacheSpec.from_config(config, tp_rank, tp_size)
    shapes = {(a.num_kv_heads, a.head_dim) for a in attn_layers}
    if len(attn_layers) != spec.num_layers or shapes != {(spec.num_kv_heads, spec.head_dim)}:
        raise ValueError(
            f"The model's attention layers ({len(attn_layers)} with (KV heads, head dim) "
            f"{sorted(shapes)}) do not match the config's KV cache ({spec.num_layers} layers, "
            f"{spec.num_kv_heads} KV heads, head dim {spec.head_dim})."
        )
    return spec


def bind_kv_caches(
    attn_layers: list[Attention],
    backend: AttentionBackend,
    spec: KVCacheSpec,
    num_blocks: int,
    device: torch.device,
) -> list[torch.Tensor]:
    """Allocate ``num_blocks`` blocks per layer through ``backend`` and bind them to the layers."""
    caches = backend.allocate_kv_cache(num_blocks, spec, device)
    for layer, cache in zip(attn_layers, caches, strict=True):
        layer.kv_cache = cache
        if layer.kv_scale.device != cache.device:  # the kernels read the scales there
            layer.kv_scale = layer.kv_scale.to(cache.device)
    return caches


def unbind_kv_caches(attn_layers: list[Attention]) -> None:
    """Drop the layers' references to their cache tensors (so the memory can be freed)."""
    for layer in attn_layers:
        layer.kv_cache = torch.empty(0)
