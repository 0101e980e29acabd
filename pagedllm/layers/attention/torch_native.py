"""Reference attention backend in plain PyTorch: runs on CPU and GPU, exact in fp32.

Decode rows (one new token each) are attended in one batched pass over their padded, gathered
contexts; prompt chunks go one sequence at a time with a causal mask offset by the number of
already-cached tokens. Simple and exact; the Triton backend replaces it on GPU. It reads the
host-side lists of the metadata every step, so it cannot be captured in a CUDA graph.
An fp8 cache is dequantized (``float(x) * scale``, ``kv_quant.py``) as it is gathered; the
attention itself is the same fp32 computation, so this is the reference for the fp8 kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.layers.attention.backend import AttentionBackend, register_backend
from pagedllm.layers.attention.kv_quant import dequantize_kv, is_fp8
from pagedllm.layers.attention.metadata import AttentionMetadata


@dataclass
class TorchNativeMetadata(AttentionMetadata):
    """The shared fields plus the step's split into decode rows and prefill sequences."""

    decode_seqs: list[int]  # sequences with exactly one new token
    prefill_seqs: list[int]  # sequences with more
    decode_rows: torch.Tensor | None  # [len(decode_seqs)] query row of each decode sequence
    decode_idx: torch.Tensor | None  # [len(decode_seqs)] the decode sequences' indices


@register_backend("torch_native")
class TorchNativeBackend(AttentionBackend):
    """Exact reference backend: gathers each sequence's blocks and runs dense softmax attention."""

    def build_metadata(self, common: AttentionMetadata) -> TorchNativeMetadata:
        qsl = common.query_start_loc_cpu
        n = len(common.seq_lens_cpu)
        decode = [i for i in range(n) if qsl[i + 1] - qsl[i] == 1]
        rows = idx = None
        if decode:
            dev = common.seq_lens.device
            rows = torch.tensor([qsl[i] for i in decode], device=dev)
            idx = torch.tensor(decode, device=dev)
        return common.specialize(
            TorchNativeMetadata,
            decode_seqs=decode,
            prefill_seqs=[i for i in range(n) if qsl[i + 1] - qsl[i] > 1],
            decode_rows=rows,
            decode_idx=idx,
        )

    def attend(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert isinstance(meta, TorchNativeMetadata), "metadata not built by this backend"
        if is_fp8(kv_cache.dtype) and kv_scale is None:
            raise ValueError("An fp8 KV cache needs the layer's kv_scale to read it.")
        out = torch.empty_like(q)
        if meta.decode_seqs:
            self._decode(q, kv_cache, meta, out, kv_scale)
        for i in meta.prefill_seqs:
            self._one_sequence(i, q, kv_cache, meta, out, kv_scale)
        return out

    @staticmethod
    def _values(x: torch.Tensor, kv_scale: torch.Tensor | None, which: int) -> torch.Tensor:
        """Gathered cache values as fp32 (dequantized with scale ``which`` if fp8)."""
        if is_fp8(x.dtype):
            assert kv_scale is not None
            return dequantize_kv(x, kv_scale[which])
        return x.float()

    def _decode(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: TorchNativeMetadata,
        out: torch.Tensor,
        kv_scale: torch.Tensor | None,
    ) -> None:
        seqs = meta.decode_seqs
        rows, idx = meta.decode_rows, meta.decode_idx
        assert rows is not None and idx is not None
        block_size = kv_cache.shape[2]
        max_len = max(meta.seq_lens_cpu[i] for i in seqs)
        tables = meta.block_tables[idx, : (max_len + block_size - 1) // block_size].long()
        b, hkv, d = len(seqs), self.num_kv_heads, self.head_dim
        group = self.num_heads // hkv
        keys = self._values(kv_cache[0][tables].flatten(1, 2)[:, :max_len], kv_scale, 0)
        vals = self._values(kv_cache[1][tables].flatten(1, 2)[:, :max_len], kv_scale, 1)
        qd = q[rows].float().view(b, hkv, group, d)  # [B, Hkv, G, D]
        scores = torch.einsum("bhgd,bshd->bhgs", qd, keys) * self.scale  # keys: [B, S, Hkv, D]
        lens = meta.seq_lens[idx].view(b, 1, 1, 1)
        pos = torch.arange(max_len, device=q.device).view(1, 1, 1, max_len)
        scores.masked_fill_(pos >= lens, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        res = torch.einsum("bhgs,bshd->bhgd", probs, vals)
        out[rows] = res.reshape(b, self.num_heads, d).to(out.dtype)

    def _one_sequence(
        self,
        i: int,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: TorchNativeMetadata,
        out: torch.Tensor,
        kv_scale: torch.Tensor | None,
    ) -> None:
        block_size = kv_cache.shape[2]
        group = self.num_heads // self.num_kv_heads
        start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        seq_len = meta.seq_lens_cpu[i]
        q_len = end - start
        blocks = meta.block_tables[i, : (seq_len + block_size - 1) // block_size].long()
        keys = self._values(kv_cache[0, blocks].flatten(0, 1)[:seq_len], kv_scale, 0)  # [S, Hkv, D]
        vals = self._values(kv_cache[1, blocks].flatten(0, 1)[:seq_len], kv_scale, 1)
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)
            vals = vals.repeat_interleave(group, dim=1)
        qi = q[start:end].transpose(0, 1).float()  # [H, Lq, D]
        scores = torch.matmul(qi, keys.permute(1, 2, 0)) * self.scale  # [H, Lq, S]
        # query j sits at absolute position seq_len - q_len + j and sees keys <= it
        qpos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        kpos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(kpos[None, :] > qpos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        res = torch.matmul(probs, vals.transpose(0, 1)).transpose(0, 1)
        out[start:end] = res.to(q.dtype)
