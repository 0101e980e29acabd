"""Admission, the scheduling policy, prefix-cache accounting and preemption of the
token-budget `Scheduler`, driven without a model by the engine loop of ``scheduler_harness``
(every step checked against the invariants of ``scheduler_invariants``).

The other scheduler tests: ``test_scheduler_seats`` (n > 1 forks and ``max_num_seqs``),
``test_scheduler_contract`` (what a step tells the worker and what updates keep) and
``test_scheduler_random`` (random workloads).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.core.sequence import SequenceStatus
from tests.core.scheduler_harness import (
    Harness,
    each_engine_mode,
    make_config,
    scheduler_for,
    seats_sched,
)
from tests.core.scheduler_workloads import (
    GroupSpec,
    SimConfig,
    blocks_needed,
    build_group,
    effective_max_tokens,
    one_context_pool,
    simulate,
    simulate_and_check,
)

# ---- admission limits and configuration --------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    bs=st.sampled_from([1, 2, 4, 16]),
    max_model_len=st.integers(2, 64),
    data=st.data(),
)
def test_add_sequence_rejects_sequences_that_can_never_fit(
    bs: int, max_model_len: int, data: st.DataObject
) -> None:
    plen = data.draw(st.integers(1, max_model_len - 1))
    max_tokens = data.draw(st.integers(1, 2 * max_model_len))
    g = GroupSpec("g", [1] * plen, max_tokens, 1, 0, 0, None, [None])
    cfg = SimConfig(bs, max_model_len, True, 8, 4, True, 0)
    need = blocks_needed(g, cfg)
    num_blocks = data.draw(st.integers(1, need + 2))
    sched = scheduler_for(
        make_config(block_size=bs, max_model_len=max_model_len, max_num_batched_tokens=8),
        num_blocks,
    )
    seq = build_group(g, max_model_len)[0]
    if need > num_blocks:
        with pytest.raises(ValueError):
            sched.add_sequence(seq)
        assert not sched.has_unfinished_sequences() and not sched.waiting
    else:
        sched.add_sequence(seq)
        assert sched.waiting == [seq]
        with pytest.raises(ValueError):  # sequence ids are unique
            sched.add_sequence(build_group(g, max_model_len)[0])


def test_chunked_prefill_off_needs_budget_for_a_whole_context() -> None:
    with pytest.raises(ValueError):
        make_config(max_model_len=32, max_num_batched_tokens=31, enable_chunked_prefill=False)
    make_config(max_model_len=32, max_num_batched_tokens=32, enable_chunked_prefill=False)
    make_config(max_model_len=32, max_num_batched_tokens=1, enable_chunked_prefill=True)
    with pytest.raises(ValueError):
        make_config(max_model_len=32, max_num_batched_tokens=0)


@pytest.mark.parametrize(
    "policy,want", [("fcfs", ["p2", "p0", "p1"]), ("priority", ["p0", "p1", "p2"])]
)
def test_scheduling_policy_orders_admission(policy: str, want: list[str]) -> None:
    """fcfs: arrival order whatever the priority; priority: lower value first, then arrival."""
    h = Harness(seats_sched(max_num_seqs=1, scheduling_policy=policy))
    sched = h.sched
    for arrival, prio in enumerate([2, 0, 1]):
        spec = GroupSpec(f"p{prio}", [0, 1], 2, 1, prio, arrival, None, [None])
        sched.add_sequence(build_group(spec, 32)[0])
    admitted: list[str] = []
    while sched.has_unfinished_sequences():
        out, sampled = h.step()
        admitted += [s.seq_id for s in out.scheduled if s.num_computed_tokens == 0]
        h.update(out, sampled)
    h.finish()
    assert admitted == want


# ---- prefix-cache accounting ---------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    bs=st.sampled_from([1, 2, 4, 16]),
    prompt=st.lists(st.integers(0, 2), min_size=1, max_size=39),
    max_tokens=st.integers(1, 6),
    budget=st.integers(1, 48),
    extra_blocks=st.integers(0, 4),
)
def test_second_identical_prompt_hits_the_cache(
    bs: int, prompt: list[int], max_tokens: int, budget: int, extra_blocks: int
) -> None:
    max_model_len = 48
    g1 = GroupSpec("a", prompt, max_tokens, 1, 0, 0, None, [None])
    g2 = GroupSpec("b", prompt, max_tokens, 1, 0, 0, None, [None])
    cfg = SimConfig(bs, max_model_len, True, budget, 4, True, 0)
    cfg.num_blocks = blocks_needed(g1, cfg) + extra_blocks
    first = simulate(cfg, [g1])
    assert first.seqs["a"][0].num_cached_tokens == 0
    sched = first.sched
    # Admit the same prompt into the same scheduler after the first finished.
    second = build_group(g2, max_model_len)[0]
    sched.add_sequence(second)
    out, _ = first.harness.step()
    assert [s.seq_id for s in out.scheduled] == [second.seq_id]
    want = (len(prompt) - 1) // bs * bs
    assert second.num_cached_tokens == want
    assert sched.kv.prefix_hits == want
    assert sched.kv.prefix_queries == 2 * len(prompt)
    assert out.scheduled[0].num_computed_tokens == want
    assert out.scheduled[0].num_new_tokens == min(len(prompt) - want, budget)


def test_prefix_hit_needs_same_leading_blocks() -> None:
    """Same second block after a different first block: the chained hash must not hit."""
    cfg = SimConfig(4, 32, True, 64, 4, True, 16)
    a = GroupSpec("a", [0, 0, 0, 0, 1, 2, 1, 2, 0], 1, 1, 0, 0, None, [None])
    b = GroupSpec("b", [1, 1, 1, 1, 1, 2, 1, 2, 0], 1, 1, 0, 0, None, [None])
    res = simulate(cfg, [a])
    seq = build_group(b, cfg.max_model_len)[0]
    res.sched.add_sequence(seq)
    res.harness.step()
    assert seq.num_cached_tokens == 0


# ---- preemption ----------------------------------------------------------------------------


@each_engine_mode
@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_tiny_pool_preempts_and_still_finishes(
    chunked: bool, prefix_caching: bool, block_size: int, lag: bool
) -> None:
    """Many long requests on a pool that fits exactly one: preemption must kick in."""
    groups = [
        GroupSpec(
            gid=f"g{k}",
            prompt=[(k + i) % 3 for i in range(4 + k % 5)],
            max_tokens=12 + k,
            n=1 + k % 3,
            priority=k % 2,
            arrival_step=k // 3,
            abort_step=None,
            stop_at=[None] * (1 + k % 3),
        )
        for k in range(8)
    ]
    cfg = one_context_pool(block_size, chunked, prefix_caching, max_num_seqs=8, policy="priority")
    cfg.num_blocks = max(blocks_needed(g, cfg) for g in groups)
    res = simulate_and_check(cfg, groups, lag)
    assert res.sched.num_preemptions > 0
    assert any(out.preempted_seq_ids for out in res.harness.history)
    preempted = [s for g in groups for s in res.seqs[g.gid] if s.num_preemptions > 0]
    assert preempted
    for seq in preempted:  # recomputed from scratch (or the cache) and still complete
        g = groups[int(seq.request_id[1:])]
        assert seq.status == SequenceStatus.FINISHED_LENGTH
        assert len(seq.output_token_ids) == effective_max_tokens(g, cfg.max_model_len)
