"""Qwen2-VL: the vision tower's image embeddings spliced into a Qwen2 decoder with M-RoPE.

The language model is Qwen2 (q/k/v bias) except for its rotary embedding: M-RoPE gives every
token three position ids (temporal, height, width) and splits each head's rotary frequencies
into three sections (``mrope_section``), section i rotated by position row i. Text tokens have
three equal ids, so for them M-RoPE is ordinary RoPE at a shifted position; image tokens get
their patch's (t, row, column) offset from the image's start. The worker computes these ids
per sequence (``pagedllm/multimodal/mrope.py``) and passes ``positions`` as ``[3, T]``, or as
``[T]`` when every row of the step is text (decode steps, which CUDA graphs replay).

Because the fused q/k-norm + rotary + KV-write kernel of the GPU backend knows only 1D
positions, this attention applies M-RoPE itself and hands rotated q/k/v to the backend's plain
``forward`` (KV write + attention), on every device.

Image embeddings come from :class:`Qwen2VisionTransformer` (``encode_images``), run by the
runner when a prompt span with image tokens is scheduled; ``forward`` takes the rows of the
step's batch that are image tokens and their embeddings and overwrites those rows of the token
embeddings. Parameter names follow the hub checkpoints (``model.layers.*``, ``visual.*``,
``lm_head``); transformers 5's layout (``model.language_model.*``, ``model.visual.*``) is read
through ``checkpoint_name``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.config import ArchitectureConfig
from pagedllm.distributed import get_tp_size
from pagedllm.layers.attention.backend import AttentionMetadata
from pagedllm.layers.attention.layer import Attention
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.quantization import QuantizationConfig
from pagedllm.models.llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    attention_projections,
    check_tensor_parallel_split,
)
from pagedllm.models.qwen2_vl_vision import Qwen2VisionTransformer


def mrope_section(cfg: ArchitectureConfig) -> list[int]:
    """The checkpoint's ``mrope_section`` (hub ``rope_scaling`` or transformers-5
    ``rope_parameters``); ValueError naming what is missing or inconsistent."""
    raw = cfg.raw
    for key in ("rope_scaling", "rope_parameters"):
        section = (raw.get(key) or {}).get("mrope_section")
        if section:
            break
    else:
        raise ValueError(f"{cfg.architecture}: config.json has no rope_scaling.mrope_section.")
    if sum(section) * 2 != cfg.head_dim:
        raise ValueError(
            f"{cfg.architecture}: mrope_section {section} must sum to head_dim / 2 "
            f"({cfg.head_dim // 2})."
        )
    return [int(s) for s in section]


class MRotaryEmbedding(nn.Module):
    """Rotary with three position rows (see the module doc); neox (rotate-half) layout."""

    def __init__(self, head_dim: int, max_position: int, base: float, section: list[int]) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [max_pos, head_dim/2]
        self.register_buffer("sin", freqs.sin(), persistent=False)
        # Which position row rotates each frequency: section i uses row i % 3.
        rows = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(section)])
        self.register_buffer("rows", rows, persistent=False)

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.ndim == 1:
            return self.cos[positions], self.sin[positions]
        cols = torch.arange(self.rows.shape[0], device=positions.device)
        picked = positions[self.rows]  # [D/2, T]: each frequency's own position row
        cos = self.cos[picked, cols[:, None]].transpose(0, 1)
        sin = self.sin[picked, cols[:, None]].transpose(0, 1)
        return cos, sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] or [3, T]; q [T, Hq, D], k [T, Hk, D]."""
        cos, sin = self._cos_sin(positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Qwen2VLAttention(nn.Module):
    """Qwen2 attention (q/k/v bias) with M-RoPE applied here, then the backend's KV write and
    attention."""

    def __init__(
        self,
        cfg: ArchitectureConfig,
        rotary: MRotaryEmbedding,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj, self.o_proj = attention_projections(cfg, True, False, quant_config, prefix)
        self.rotary = rotary  # one table for every layer
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v.contiguous(), meta).flatten(1))


class Qwen2VLDecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm block (its ``forward``), with the M-RoPE attention."""

    def __init__(
        self,
        cfg: ArchitectureConfig,
        rotary: MRotaryEmbedding,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        nn.Module.__init__(self)  # the same submodules as Llama's, but this attention
        self.self_attn = Qwen2VLAttention(cfg, rotary, quant_config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(cfg, quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2VLTextModel(nn.Module):
    def __init__(self, cfg: ArchitectureConfig, quant_config: QuantizationConfig | None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, quant_config=quant_config, prefix="model.embed_tokens"
        )
        rotary = MRotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, mrope_section(cfg)
        )
        self.layers = nn.ModuleList(
            Qwen2VLDecoderLayer(cfg, rotary, quant_config, f"model.layers.{i}")
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        mm_rows: torch.Tensor | None = None,
        mm_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if mm_rows is not None and mm_embeds is not None:
            x = x.index_copy(0, mm_rows, mm_embeds.to(x.dtype))
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class Qwen2VLForConditionalGeneration(nn.Module):
    """Qwen2-VL (see the module doc). ``multimodal`` tells the runner to compute M-RoPE
    positions and image embeddings for it."""

    multimodal = True
    packed_modules = LlamaForCausalLM.packed_modules

    def __init__(
        self, cfg: ArchitectureConfig, quant_config: QuantizationConfig | None = None
    ) -> None:
        super().__init__()
        if get_tp_size() != 1:
            raise NotImplementedError(
                f"{cfg.architecture}: tensor parallelism is not supported for vision models yet."
            )
        check_tensor_parallel_split(cfg, 1)
        self.config = cfg
        vcfg: dict[str, Any] = cfg.raw.get("vision_config") or {}
        if not vcfg:
            raise ValueError(f"{cfg.architecture}: config.json has no vision_config.")
        self.spatial_merge_size = int(vcfg.get("spatial_merge_size", 2))
        self.visual = self.build_vision(vcfg, cfg.hidden_size)
        self.model = Qwen2VLTextModel(cfg, quant_config)
        self.lm_head = ParallelLMHead(
            cfg.vocab_size, cfg.hidden_size, quant_config=quant_config, prefix="lm_head"
        )
        if cfg.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)

    @staticmethod
    def checkpoint_name(name: str) -> str:
        """A checkpoint tensor's name in the hub layout this model's parameters use."""
        if name.startswith("model.language_model."):
            return "model." + name[len("model.language_model.") :]
        if name.startswith("model.visual."):
            return name[len("model.") :]
        return name

    @staticmethod
    def build_vision(vcfg: dict[str, Any], out_dim: int) -> nn.Module:
        return Qwen2VisionTransformer(vcfg, out_dim)

    def encode_images(
        self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]
    ) -> list[torch.Tensor]:
        """Embeddings of each image (``t*h*w / merge**2`` rows each), in the model's dtype."""
        dtype = self.model.embed_tokens.weight.dtype
        out = self.visual(pixels.to(dtype), grids)
        merge = self.spatial_merge_size**2
        return list(out.split([t * h * w // merge for t, h, w in grids]))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        mm_rows: torch.Tensor | None = None,
        mm_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta, mm_rows, mm_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
