"""Triton paged-attention backend for NVIDIA GPUs (see ``pagedllm/kernels/paged_attention``).

Decode-only steps use the split-KV (flash-decoding) path, whose launch depends only on the
batch size (CUDA-graph safe); any other step uses the mixed path with a per-step program list.
"""

from __future__ import annotations

import torch
import triton

from pagedllm.kernels.paged_attention import (
    mixed_block_q,
    mixed_programs,
    num_sms,
    paged_attention,
)
from pagedllm.layers.attention.backend import AttentionBackend, AttentionMetadata, register_backend


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Enough context slices to give every SM two programs, each slice >= 128 tokens."""
    want = triton.cdiv(2 * num_sms, max(num_seqs * num_kv_heads, 1))
    most = triton.cdiv(max_seq_len, 128)
    return max(1, min(triton.next_power_of_2(min(want, most)), 32))


@register_backend("triton")
class TritonBackend(AttentionBackend):
    accepts_written_kv = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        self.num_sms = num_sms(torch.device("cuda"))

    def prepare(self, meta: AttentionMetadata) -> None:
        if "decode" in meta.extra:  # set by the CUDA-graph runner
            return
        decode = meta.max_query_len == 1
        meta.extra["decode"] = decode
        if decode:
            num_seqs = meta.extra.get("num_seqs", meta.num_seqs)  # graphs pass it (no CPU lists)
            meta.extra["num_splits"] = decode_num_splits(
                num_seqs, self.num_kv_heads, meta.max_seq_len, self.num_sms
            )
        else:
            block_q = mixed_block_q(self.num_heads, self.num_kv_heads)
            meta.extra["programs"] = mixed_programs(
                meta.query_start_loc_cpu, block_q, meta.seq_lens.device
            )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if k is not None and v is not None:
            self.write_kv(kv_cache, k, v, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # q may be a strided view
        return paged_attention(
            q,
            kv_cache,
            out,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            self.scale,
            decode=meta.extra["decode"],
            num_splits=meta.extra.get("num_splits", 1),
            programs=meta.extra.get("programs"),
        )
