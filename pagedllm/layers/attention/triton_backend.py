"""Triton paged-attention backend for NVIDIA GPUs (see ``pagedllm/kernels/paged_attention``).

Decode-only steps use the split-KV (flash-decoding) path, whose launch depends only on the
batch size (CUDA-graph safe); any other step uses the mixed path with a per-step program list.
On CUDA tensors ``forward_qkv`` runs q/k norm, rotary and the KV write as one kernel
(``kernels/qkv_rope.py``) and then attends over the cache it just wrote. With an fp8 cache
both kernels take the layer's (k_scale, v_scale) device tensor: the write divides by it, the
attention multiplies it back in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton

from pagedllm.kernels.paged_attention import (
    mixed_block_q,
    mixed_programs,
    num_sms,
    paged_attention,
)
from pagedllm.layers.attention.backend import AttentionBackend, register_backend
from pagedllm.layers.attention.metadata import AttentionMetadata
from pagedllm.layers.fused import use_fused

if TYPE_CHECKING:
    from pagedllm.layers.norm import RMSNorm
    from pagedllm.layers.rotary import RotaryEmbedding


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Enough context slices to give every SM two programs, each slice >= 128 tokens."""
    want = triton.cdiv(2 * num_sms, max(num_seqs * num_kv_heads, 1))
    most = triton.cdiv(max_seq_len, 128)
    return max(1, min(triton.next_power_of_2(min(want, most)), 32))


@dataclass
class TritonMetadata(AttentionMetadata):
    """The shared fields plus the kernel's launch plan for this step.

    A decode step (every query length 1) launches one program per (sequence, KV head, split);
    any other step lists its programs in ``programs`` (sequence, first query token), built on
    the host each step, which is why only decode steps are captured in CUDA graphs.
    """

    decode: bool
    num_splits: int = 1
    programs: tuple[torch.Tensor, torch.Tensor] | None = None


@register_backend("triton")
class TritonBackend(AttentionBackend):
    """Triton paged attention; on CUDA the KV write is fused into the q/k rotary kernel."""

    supports_cuda_graphs = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        self.num_sms = num_sms(torch.device("cuda"))

    def build_metadata(self, common: AttentionMetadata) -> TritonMetadata:
        if common.max_query_len == 1:
            # num_seqs comes from a tensor shape: CUDA-graph steps have no host lists.
            splits = decode_num_splits(
                common.num_seqs, self.num_kv_heads, common.max_seq_len, self.num_sms
            )
            return common.specialize(TritonMetadata, decode=True, num_splits=splits)
        block_q = mixed_block_q(self.num_heads, self.num_kv_heads)
        programs = mixed_programs(common.query_start_loc_cpu, block_q, common.seq_lens.device)
        return common.specialize(TritonMetadata, decode=False, programs=programs)

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
        if not use_fused(qkv):  # CPU tensors, or fused kernels disabled
            return super().forward_qkv(
                qkv, positions, rotary, q_norm, k_norm, kv_cache, meta, kv_scale
            )
        from pagedllm.kernels.qkv_rope import qkv_rope_store

        q = qkv_rope_store(
            qkv,
            positions,
            rotary.cos,
            rotary.sin,
            kv_cache,
            meta.slot_mapping,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            q_norm.weight if q_norm is not None else None,
            k_norm.weight if k_norm is not None else None,
            q_norm.eps if q_norm is not None else 1e-6,
            kv_scale,
        )
        return self.attend(q, kv_cache, meta, kv_scale)

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert isinstance(meta, TritonMetadata), "metadata not built by this backend"
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # q may be a strided view
        return paged_attention(
            q,
            kv_cache,
            out,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            self.scale,
            decode=meta.decode,
            num_splits=meta.num_splits,
            programs=meta.programs,
            kv_scale=kv_scale,
        )
