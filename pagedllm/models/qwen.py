"""Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) as variants of the Llama decoder."""

from __future__ import annotations

from pagedllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
