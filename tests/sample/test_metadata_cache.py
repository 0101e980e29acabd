"""``SamplingMetadataCache``: the last step's metadata is reused only for the very same rows
(ids and ``SamplingParams`` objects) and never for rows whose metadata reads token history."""

from __future__ import annotations

import copy

import torch

from pagedllm.sample.metadata import SamplingMetadata, SamplingMetadataCache, SamplingRow
from pagedllm.sample.token_mask import unpack_token_mask
from pagedllm.sampling_params import SamplingParams

CPU = torch.device("cpu")
V = 50


def _rows(params: list[SamplingParams]) -> list[SamplingRow]:
    return [SamplingRow(p, [1, 2], [3], None) for p in params]


def test_reused_for_the_same_rows_only() -> None:
    cache = SamplingMetadataCache(V, CPU)
    a, b = SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=0.0)
    first = cache.get(_rows([a, b]), ["x", "y"])
    assert cache.get(_rows([a, b]), ["x", "y"]) is first and cache.hits == 1
    assert cache.get(_rows([b, a]), ["y", "x"]) is not first  # order changed
    again = cache.get(_rows([a, b]), ["x", "y"])
    assert again is not first and cache.hits == 1  # the cache holds the last batch only
    # Same ids, but a new request (new params object, other settings) reused id "x".
    other = copy.copy(a)
    other.top_k = 3
    fresh = cache.get(_rows([other, b]), ["x", "y"])
    assert fresh is not again and fresh.top_k is not None and fresh.top_k.tolist() == [3, V]


def test_history_dependent_fields_are_rebuilt_on_a_hit() -> None:
    """Rows whose metadata follows their tokens (penalties, min_tokens) reuse the cached
    static tensors, while their history fields are rebuilt from this step's tokens."""
    cache = SamplingMetadataCache(V, CPU)
    pen = SamplingParams(repetition_penalty=1.2)
    mt = SamplingParams(min_tokens=3)
    mt.update_from_generation_config({0})
    plain = SamplingParams()
    step1 = [SamplingRow(plain, [1], [3], None), SamplingRow(pen, [1, 2], [3], None),
             SamplingRow(mt, [1], [3], None)]  # fmt: skip
    first = cache.get(step1, ["a", "b", "c"])
    assert first.banned_rows is not None and first.banned_rows.tolist() == [2]
    step2 = [SamplingRow(plain, [1], [3, 4], None), SamplingRow(pen, [1, 2], [3, 9], None),
             SamplingRow(mt, [1], [3, 4, 5], None)]  # fmt: skip
    second = cache.get(step2, ["a", "b", "c"])
    assert cache.hits == 1 and second.greedy_mask is first.greedy_mask
    assert second.penalty_rows is first.penalty_rows  # static: reused
    assert second.output_token_ids is not None and second.output_token_ids.tolist() == [[3, 9]]
    assert second.banned_rows is None  # min_tokens reached
    fresh = SamplingMetadata.build(step2, V, CPU)
    for name in ("prompt_token_ids", "output_token_ids", "banned_rows", "banned_tokens"):
        a, b = getattr(second, name), getattr(fresh, name)
        assert (a is None and b is None) or torch.equal(a, b), name


def test_grammar_mask_rides_on_the_cached_rows() -> None:
    """A grammar mask (new every step) is attached to the cached metadata: the per-row
    tensors are reused, the mask is this step's; with allowed_token_ids the two combine."""
    cache = SamplingMetadataCache(V, CPU)
    rows = _rows([SamplingParams(temperature=0.5), SamplingParams(temperature=0.0)])
    plain = cache.get(rows, ["a", "b"])
    mask = torch.ones(2, V, dtype=torch.bool)
    mask[0, 7] = False
    masked = cache.get(rows, ["a", "b"], mask)
    assert masked.greedy_mask is plain.greedy_mask and masked.temperature is plain.temperature
    assert plain.allowed_token_mask is None and masked.allowed_token_mask is not None
    assert unpack_token_mask(masked.allowed_token_mask, V).equal(mask)
    assert cache.get(rows, ["a", "b"]) is plain  # the cached metadata itself has no mask
    limited = _rows([SamplingParams(allowed_token_ids=[5, 6, 7]), SamplingParams()])
    both = cache.get(limited, ["c", "d"], mask)
    allowed = unpack_token_mask(both.allowed_token_mask, V)
    assert allowed[0].nonzero().flatten().tolist() == [5, 6] and bool(allowed[1].all())
