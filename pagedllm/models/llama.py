"""Llama-family decoder (Llama 2/3, Mistral; Qwen2/Qwen3 reuse it with bias / q-k norm).

Tokens arrive flattened ([T] ids with [T] positions), attention goes through the backend, and
logits are computed only for the rows the sampler needs. Projections are the parallel linear
layers of ``layers/linear.py``: each is built with the checkpoint's quantization config and
its module name (``prefix``), and loads its own checkpoint tensors; ``packed_modules`` tells
the loader which checkpoint tensors are parts of a fused layer.

One class serves every tensor-parallel size: the layers read the rank and size from
``pagedllm.distributed`` when built, and the attention block takes its per-rank head counts
from its q/k/v projection. A model whose head or MLP sizes cannot be split over the ranks
fails at construction with a ``ValueError`` naming its numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.config import ArchitectureConfig
from pagedllm.distributed import get_tp_size
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.attention.backend import AttentionMetadata
from pagedllm.layers.attention.layer import Attention
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    split_attention_heads,
)
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.quantization import QuantizationConfig
from pagedllm.layers.rotary import RotaryEmbedding


def attention_projections(
    cfg: ArchitectureConfig,
    qkv_bias: bool,
    o_bias: bool,
    quant_config: QuantizationConfig | None,
    prefix: str,
) -> tuple[QKVParallelLinear, RowParallelLinear]:
    """The fused q/k/v projection and the output projection of one attention block."""
    qkv = QKVParallelLinear(
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        bias=qkv_bias,
        quant_config=quant_config,
        prefix=f"{prefix}.qkv_proj",
    )
    o = RowParallelLinear(
        cfg.num_attention_heads * cfg.head_dim,
        cfg.hidden_size,
        bias=o_bias,
        quant_config=quant_config,
        prefix=f"{prefix}.o_proj",
    )
    return qkv, o


class LlamaAttention(nn.Module):
    """Fused q/k/v projection, attention through the backend (rotary, optional q/k norm),
    output projection."""

    def __init__(
        self,
        cfg: ArchitectureConfig,
        qkv_bias: bool,
        qk_norm: bool,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj, self.o_proj = attention_projections(
            cfg, qkv_bias, cfg.attention_bias, quant_config, prefix
        )
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.rotary = RotaryEmbedding(
            self.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        # This rank's heads (KV heads may be replicas shared with neighbouring ranks).
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        out = self.attn.forward_qkv(qkv, positions, self.rotary, self.q_norm, self.k_norm, meta)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: fused gate/up projection, SiLU(gate) * up, down projection."""

    def __init__(
        self, cfg: ArchitectureConfig, quant_config: QuantizationConfig | None, prefix: str
    ) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size,
            [size, size],
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            size, cfg.hidden_size, quant_config=quant_config, prefix=f"{prefix}.down_proj"
        )
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; the residual add is fused into the next norm."""

    def __init__(
        self,
        cfg: ArchitectureConfig,
        qkv_bias: bool,
        qk_norm: bool,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(
            cfg, qkv_bias, qk_norm, quant_config, prefix=f"{prefix}.self_attn"
        )
        self.mlp = LlamaMLP(cfg, quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm: token ids -> last hidden states."""

    def __init__(
        self,
        cfg: ArchitectureConfig,
        qkv_bias: bool,
        qk_norm: bool,
        quant_config: QuantizationConfig | None,
        prefix: str = "model",
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size,
            cfg.hidden_size,
            quant_config=quant_config,
            prefix=f"{prefix}.embed_tokens",
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, qkv_bias, qk_norm, quant_config, prefix=f"{prefix}.layers.{i}")
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    """Parameter names match Hugging Face's checkpoints except for the fused projections."""

    qkv_bias = False
    qk_norm = False
    # Checkpoint module -> (fused module, shard id passed to its weight loader).
    packed_modules: dict[str, tuple[str, int | str]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self, cfg: ArchitectureConfig, quant_config: QuantizationConfig | None = None
    ) -> None:
        super().__init__()
        check_tensor_parallel_split(cfg, get_tp_size())
        self.config = cfg
        self.quant_config = quant_config
        self.model = LlamaModel(
            cfg, self.qkv_bias or cfg.attention_bias, self.qk_norm, quant_config
        )
        self.lm_head = ParallelLMHead(
            cfg.vocab_size, cfg.hidden_size, quant_config=quant_config, prefix="lm_head"
        )
        if cfg.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral's dense models are Llama-shaped (sliding window unused by the shipped configs)."""


def check_tensor_parallel_split(cfg: ArchitectureConfig, tp_size: int) -> None:
    """Refuse, naming the model's numbers, a ``tp_size`` its heads or MLP cannot be split over."""
    split_attention_heads(
        cfg.num_attention_heads, cfg.num_key_value_heads, tp_size, cfg.architecture
    )
    if cfg.intermediate_size % tp_size:
        raise ValueError(
            f"{cfg.architecture}: intermediate_size {cfg.intermediate_size} is not divisible "
            f"by tensor_parallel_size={tp_size}."
        )
