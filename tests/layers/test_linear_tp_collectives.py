"""Sharded layers with their collectives on two gloo ranks equal the unsharded layer; KV
heads replicated when there are fewer than ranks.

``test_tp_layout.py`` checks which slice each rank loads; here the forward passes run for
real: row-parallel (bias added once, partial sums all-reduced), column-parallel with
``gather_output``, and an odd vocabulary (7 ids over 2 ranks, so rank 1 has a padding row)
through the masked embedding lookup and the LM head's gather.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from pagedllm.distributed import TensorParallelGroup, parallel_state
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedllm.layers.quantization.fp8 import Fp8Config
from tests.distributed.tp_harness import spawn_ranks


def _load(param: torch.nn.Parameter, tensor: torch.Tensor) -> None:
    param.weight_loader(param, tensor)  # type: ignore[attr-defined]


def _load_part(param: torch.nn.Parameter, tensor: torch.Tensor, shard_id: str) -> None:
    param.weight_loader(param, tensor, shard_id)  # type: ignore[attr-defined]


def _layers_match_unsharded(rank: int, world_size: int) -> None:
    gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    w, b = torch.randn(3, 8, generator=gen), torch.randn(3, generator=gen)
    x = torch.randn(5, 8, generator=gen)
    row = RowParallelLinear(8, 3, bias=True)
    _load(row.weight, w)
    _load(row.bias, b)
    k = 8 // world_size
    torch.testing.assert_close(row(x[:, rank * k : (rank + 1) * k]), F.linear(x, w, b))

    col = ColumnParallelLinear(8, 6, bias=True, gather_output=True)
    wc, bc = torch.randn(6, 8, generator=gen), torch.randn(6, generator=gen)
    _load(col.weight, wc)
    _load(col.bias, bc)
    torch.testing.assert_close(col(x), F.linear(x, wc, bc))

    table = torch.randn(7, 8, generator=gen)
    ids = torch.tensor([0, 6, 3, 4, 4, 1])
    embed = VocabParallelEmbedding(7, 8)
    _load(embed.weight, table)
    assert torch.equal(embed(ids), F.embedding(ids, table))  # one non-zero term per row
    head = ParallelLMHead(7, 8).tie_weights(embed)
    logits = head(x)
    assert logits.shape == (5, 7)
    torch.testing.assert_close(logits, F.linear(x, table))


def test_sharded_layers_on_two_ranks(tmp_path: Path) -> None:
    spawn_ranks(_layers_match_unsharded, 2, tmp_path)


def _fp8(x: torch.Tensor, w: torch.Tensor, round_w: bool = True) -> torch.Tensor:
    """One rank's share in fp8, written out: per-token activation and (``round_w``: a weight
    quantized at load) per-row weight scales (amax / 448), values rounded to e4m3, then a
    dense product of the dequantized values."""

    def rounded(t: torch.Tensor) -> torch.Tensor:
        scale = (t.abs().amax(dim=-1, keepdim=True) / 448.0).clamp(min=1 / (448.0 * 512))
        return (t / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale

    return F.linear(rounded(x), rounded(w) if round_w else w)


def _fp8_layers_on_ranks(rank: int, world_size: int) -> None:
    """fp8 quantized at load (``--quantization fp8``) over the ranks: a column-parallel layer
    computes exactly what one rank does (whole rows, whole tokens); a row-parallel one sums
    each rank's fp8 product of its slice (its own activation and weight scales)."""
    cfg = Fp8Config(is_checkpoint_fp8=False)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 16, generator=gen) * torch.logspace(-2, 1, 16)
    col = ColumnParallelLinear(16, 6, bias=False, quant_config=cfg, gather_output=True)
    wc = torch.randn(6, 16, generator=gen)
    _load(col.weight, wc)
    col.quant_method.process_weights_after_loading(col)
    torch.testing.assert_close(col(x), _fp8(x, wc), rtol=1e-6, atol=1e-6)

    row = RowParallelLinear(16, 3, bias=False, quant_config=cfg)
    w = torch.randn(3, 16, generator=gen)
    _load(row.weight, w)
    row.quant_method.process_weights_after_loading(row)
    k = 16 // world_size
    parts = [_fp8(x[:, r * k : (r + 1) * k], w[:, r * k : (r + 1) * k]) for r in range(world_size)]
    got = row(x[:, rank * k : (rank + 1) * k])
    torch.testing.assert_close(got, sum(parts), rtol=1e-5, atol=1e-5)
    assert (got - F.linear(x, w)).abs().max() < 0.1 * F.linear(x, w).abs().max()

    # An fp8 checkpoint: e4m3 weights with per-channel scales, cut like dense ones (a
    # row-parallel layer keeps every row's scale).
    ckpt = Fp8Config(is_checkpoint_fp8=True)
    wq = (torch.randn(6, 16, generator=gen) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(6, generator=gen) + 0.01
    dense = wq.float() * scale[:, None]
    col8 = ColumnParallelLinear(16, 6, bias=False, quant_config=ckpt, gather_output=True)
    row8 = RowParallelLinear(16, 6, bias=False, quant_config=ckpt)
    for layer in (col8, row8):
        _load(layer.weight, wq)
        _load(layer.weight_scale, scale)
        layer.quant_method.process_weights_after_loading(layer)
    torch.testing.assert_close(col8(x), _fp8(x, dense, False), rtol=1e-5, atol=1e-4)
    want = sum(
        _fp8(x[:, r * k : (r + 1) * k], dense[:, r * k : (r + 1) * k], False)
        for r in range(world_size)
    )
    torch.testing.assert_close(row8(x[:, rank * k : (rank + 1) * k]), want, rtol=1e-5, atol=1e-4)


def test_fp8_layers_on_two_ranks(tmp_path: Path) -> None:
    spawn_ranks(_fp8_layers_on_ranks, 2, tmp_path)


def test_fewer_kv_heads_than_ranks_replicate(monkeypatch: pytest.MonkeyPatch) -> None:
    """4 query heads, 2 KV heads, 4 ranks: rank r holds query head r and KV head r // 2
    (the one its query head is grouped with at TP=1), from parts or a fused tensor."""
    head, hidden = 2, 4
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n * head, hidden, generator=gen) for n in (4, 2, 2))
    for rank in range(4):
        monkeypatch.setattr(parallel_state, "_tp_group", TensorParallelGroup(rank, 4))
        parts, fused = (QKVParallelLinear(hidden, head, 4, 2, bias=True) for _ in range(2))
        assert (parts.num_heads, parts.num_kv_heads, parts.kv_replicas) == (1, 1, 2)
        for sid, t in (("q", q), ("k", k), ("v", v)):
            _load_part(parts.weight, t, sid)
            _load_part(parts.bias, t[:, 0], sid)
        _load(fused.weight, torch.cat([q, k, v]))
        _load(fused.bias, torch.cat([q, k, v])[:, 0])
        kv = slice(rank // 2 * head, (rank // 2 + 1) * head)
        want = torch.cat([q[rank * head : (rank + 1) * head], k[kv], v[kv]])
        for layer in (parts, fused):
            assert torch.equal(layer.weight, want) and torch.equal(layer.bias, want[:, 0])
