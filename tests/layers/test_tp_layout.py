"""The shard loaders are right for tp_size > 1: build each rank's layer with a patched
rank / world size, load the full checkpoint tensors, and check that the ranks' slices
recombine into the unsharded layer (concatenated columns, summed row-parallel partials)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.nn import functional as F

from pagedllm.layers import embedding as embedding_mod
from pagedllm.layers import linear as linear_mod
from pagedllm.layers.embedding import VocabParallelEmbedding
from pagedllm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

TP = 2


def _ranks(monkeypatch: pytest.MonkeyPatch, build: Callable[[], torch.nn.Module]) -> list:
    layers = []
    for rank in range(TP):
        for mod in (linear_mod, embedding_mod):
            monkeypatch.setattr(mod, "get_tp_rank", lambda rank=rank: rank)
            monkeypatch.setattr(mod, "get_tp_size", lambda: TP)
        layers.append(build())
    return layers


def _load(param: torch.nn.Parameter, tensor: torch.Tensor, shard_id: object = None) -> None:
    if shard_id is None:
        param.weight_loader(param, tensor)
    else:
        param.weight_loader(param, tensor, shard_id)


def test_column_parallel_ranks_concatenate(monkeypatch: pytest.MonkeyPatch) -> None:
    w, b, x = torch.randn(6, 4), torch.randn(6), torch.randn(3, 4)
    ranks = _ranks(monkeypatch, lambda: ColumnParallelLinear(4, 6, bias=True))
    for layer in ranks:
        _load(layer.weight, w)
        _load(layer.bias, b)
    assert ranks[0].weight.shape == (3, 4)
    assert torch.allclose(torch.cat([r(x) for r in ranks], -1), F.linear(x, w, b))


def test_merged_gate_up_rank_holds_its_gate_and_up(monkeypatch: pytest.MonkeyPatch) -> None:
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    ranks = _ranks(monkeypatch, lambda: MergedColumnParallelLinear(4, [8, 8]))
    for layer in ranks:
        _load(layer.weight, gate, 0)
        _load(layer.weight, up, 1)
    for r, layer in enumerate(ranks):
        assert torch.equal(
            layer.weight, torch.cat([gate[4 * r : 4 * r + 4], up[4 * r : 4 * r + 4]])
        )


def test_qkv_rank_holds_its_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    head, heads, kv_heads = 2, 4, 2
    q, k, v = torch.randn(8, 4), torch.randn(4, 4), torch.randn(4, 4)
    ranks = _ranks(monkeypatch, lambda: QKVParallelLinear(4, head, heads, kv_heads))
    for layer in ranks:
        for sid, t in (("q", q), ("k", k), ("v", v)):
            _load(layer.weight, t, sid)
    for r, layer in enumerate(ranks):
        assert layer.num_heads == 2 and layer.num_kv_heads == 1
        want = torch.cat([q[4 * r : 4 * r + 4], k[2 * r : 2 * r + 2], v[2 * r : 2 * r + 2]])
        assert torch.equal(layer.weight, want)
    with pytest.raises(ValueError, match=r"expects shape \(4, 4\).*\(2, 4\)"):
        _load(ranks[1].weight, k[:2], "k")  # a pre-sharded tensor is rejected, not misplaced
    with pytest.raises(ValueError, match="4 attention heads and 3 KV heads"):
        _ranks(monkeypatch, lambda: QKVParallelLinear(4, head, heads, 3))


def test_row_parallel_partials_sum_to_full(monkeypatch: pytest.MonkeyPatch) -> None:
    w, b, x = torch.randn(3, 8), torch.randn(3), torch.randn(5, 8)
    ranks = _ranks(monkeypatch, lambda: RowParallelLinear(8, 3, bias=True))
    for layer in ranks:
        _load(layer.weight, w)
        _load(layer.bias, b)
    parts = [
        layer.quant_method.apply(layer, x[:, 4 * r : 4 * r + 4], layer.bias if r == 0 else None)
        for r, layer in enumerate(ranks)
    ]
    assert torch.allclose(sum(parts), F.linear(x, w, b), atol=1e-6)
    with pytest.raises(RuntimeError, match="group of 1 rank"):
        ranks[0](x[:, :4])  # built for 2 ranks, no process group joined


def test_vocab_rows_split_with_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    table = torch.randn(7, 3)
    ranks = _ranks(monkeypatch, lambda: VocabParallelEmbedding(7, 3))
    for layer in ranks:
        _load(layer.weight, table)
    assert torch.equal(ranks[0].weight, table[:4])
    assert torch.equal(ranks[1].weight[:3], table[4:]) and not ranks[1].weight[3].any()
