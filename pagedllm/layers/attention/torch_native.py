"""Reference attention backend in plain PyTorch: runs on CPU and GPU, exact in fp32.

Each sequence's context is gathered from its KV blocks and attended with a causal mask offset
by the number of already-cached tokens. Simple and slow; the Triton backend replaces it on GPU.
"""

from __future__ import annotations

import torch

from pagedllm.layers.attention.backend import AttentionBackend, AttentionMetadata, register_backend


@register_backend("torch_native")
class TorchNativeBackend(AttentionBackend):
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        self.write_kv(kv_cache, k, v, meta.slot_mapping)
        block_size = kv_cache.shape[2]
        group = self.num_heads // self.num_kv_heads
        out = torch.empty_like(q)
        qsl = meta.query_start_loc_cpu
        for i, seq_len in enumerate(meta.seq_lens_cpu):
            start, end = qsl[i], qsl[i + 1]
            q_len = end - start
            num_blocks = (seq_len + block_size - 1) // block_size
            blocks = meta.block_tables[i, :num_blocks].long()
            keys = kv_cache[0, blocks].flatten(0, 1)[:seq_len]  # [S, Hkv, D]
            vals = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
            if group > 1:
                keys = keys.repeat_interleave(group, dim=1)
                vals = vals.repeat_interleave(group, dim=1)
            qi = q[start:end].transpose(0, 1).float()  # [H, Lq, D]
            scores = torch.matmul(qi, keys.permute(1, 2, 0).float()) * self.scale  # [H, Lq, S]
            if q_len > 1:
                # query j sits at absolute position seq_len - q_len + j and sees keys <= it
                qpos = torch.arange(seq_len - q_len, seq_len, device=q.device)
                kpos = torch.arange(seq_len, device=q.device)
                scores.masked_fill_(kpos[None, :] > qpos[:, None], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[start:end] = (
                torch.matmul(probs, vals.transpose(0, 1).float()).transpose(0, 1).to(q.dtype)
            )
        return out
