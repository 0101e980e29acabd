"""Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) as variants of the Llama decoder.

The class flags are all that differs: the layers, parameter names (hence checkpoint
compatibility and the dummy-init order) and loading are the Llama model's.
"""

from __future__ import annotations

from pagedllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with a bias on the fused q/k/v projection (``qkv_proj.bias``)."""

    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with RMSNorm over each query / key head before rotary (``q_norm``, ``k_norm``)."""

    qk_norm = True
