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
