"""Seats: n > 1 requests fork their siblings on the leader's first token, and every running
sequence, and every seat a leader claims for its unforked siblings, counts against
``max_num_seqs``; siblings without a seat queue (from scratch, their first token sampled).
Driven without a model by the engine loop of ``scheduler_harness``.
"""

from __future__ import annotations

import pytest

from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.core.sequence import Sequence, SequenceStatus
from tests.core.scheduler_harness import LAGS, Harness, drive, each_engine_mode, seats_sched
from tests.core.scheduler_workloads import (
    GroupSpec,
    SimConfig,
    build_group,
    effective_max_tokens,
    make_scheduler,
    one_context_pool,
    simulate_and_check,
)


def test_siblings_beyond_the_free_seats_wait_in_the_queue() -> None:
    """n=8 with max_num_seqs=2: the leader claims 2 seats, forks one sibling into the batch
    and queues the other six; all eight finish, never more than two at once."""
    h = Harness(seats_sched(max_num_seqs=2))
    sched = h.sched
    seqs = build_group(GroupSpec("a", [0, 1, 2, 0, 1], 5, 8, 0, 0, None, [None] * 8), 32)
    sched.add_sequence(seqs[0])
    out, sampled = h.step()
    assert [(s.seq_id, s.samples) for s in out.scheduled] == [("a", True)]
    assert out.scheduled[0].sample_seq_ids == [s.seq_id for s in seqs]
    assert [n.seq_id for n in out.new_sequences] == [s.seq_id for s in seqs[1:]] + ["a"]
    assert sampled == {s.seq_id: [1] for s in seqs}
    h.update(out, sampled)
    assert sched.running == seqs[:2]
    assert sched.waiting == seqs[2:]
    for child in seqs[2:]:  # starts from scratch later, its first token already sampled
        assert child.status == SequenceStatus.WAITING and child.num_computed_tokens == 0
        assert child.output_token_ids == [1] and sched.kv.block_ids(child.seq_id) == []
    assert sched.kv.block_ids(seqs[1].seq_id)[:1] == sched.kv.block_ids("a")[:1]  # shared
    drive(h)
    for seq in seqs:
        assert seq.status == SequenceStatus.FINISHED_LENGTH and seq.output_token_ids == [1] * 5
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


@LAGS
@pytest.mark.parametrize("max_num_seqs", [1, 2, 3])
def test_big_n_does_not_starve_or_deadlock_others(max_num_seqs: int, lag: bool) -> None:
    """An n=8 group between a running request and a later one: everything finishes, and a
    higher-priority request arriving while siblings queue takes the next free seat."""
    h = Harness(seats_sched(max_num_seqs, scheduling_policy="priority"), lag)
    sched = h.sched
    ahead = build_group(GroupSpec("ahead", [2, 2, 1], 9, 1, 1, 0, None, [None]), 32)
    big = build_group(GroupSpec("big", [0, 1, 2, 0, 1], 4, 8, 1, 0, None, [None] * 8), 32)
    after = build_group(GroupSpec("after", [1, 0], 3, 1, 1, 0, None, [None]), 32)
    urgent = build_group(GroupSpec("urgent", [1, 1], 3, 1, 0, 0, None, [None]), 32)
    for g in (ahead, big, after):
        sched.add_sequence(g[0])
    queued: list[Sequence] = []

    def arrive(step: int) -> None:
        if not queued and any(s in sched.waiting for s in big[1:]):
            queued.extend(s for s in big[1:] if s in sched.waiting)
            sched.add_sequence(urgent[0])

    first = drive(h, on_step=arrive)
    for seq in ahead + big + after + urgent:
        assert seq.status == SequenceStatus.FINISHED_LENGTH, seq.seq_id
        assert len(seq.output_token_ids) == seq.max_tokens
    assert queued, "no sibling ever waited for a seat"
    assert all(first["urgent"] < first[s.seq_id] for s in queued)
    assert first["after"] > max(first[s.seq_id] for s in big)  # arrival order otherwise


@each_engine_mode
@pytest.mark.parametrize("max_num_seqs", [1, 2, 3])
def test_big_n_under_preemption_pressure(
    max_num_seqs: int, prefix_caching: bool, chunked: bool, lag: bool
) -> None:
    """Groups of n=4..8 on a pool that fits one sequence: preemption, queued forks and
    re-admissions interleave; seats and completion hold."""
    cfg = one_context_pool(2, chunked, prefix_caching, max_num_seqs, policy="fcfs")
    specs = [
        GroupSpec(f"g{k}", [(k + i) % 3 for i in range(3 + k)], 10 + k, 4 + 2 * k, 0, 0, None, [])
        for k in range(3)
    ]
    h = Harness(make_scheduler(cfg), lag)
    sched = h.sched
    groups = [build_group(g, cfg.max_model_len) for g in specs]
    for g in groups:
        sched.add_sequence(g[0])
    drive(h)
    assert sched.num_preemptions > 0 or max_num_seqs == 1
    for g, spec in zip(groups, specs, strict=True):
        for seq in g:
            assert seq.status == SequenceStatus.FINISHED_LENGTH
            assert len(seq.output_token_ids) == effective_max_tokens(spec, cfg.max_model_len)
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


# ---- regressions: bugs these tests found, since fixed ------------------------------------


@LAGS
def test_forks_of_running_leaders_respect_max_num_seqs(lag: bool) -> None:
    """Regression (fixed in 497031c): pending siblings of running leaders count as running."""
    cfg = SimConfig(4, 32, True, 64, 3, False, 32)
    groups = [
        GroupSpec("a", [0, 1, 2, 0, 1], 4, 3, 0, 0, None, [None] * 3),  # 3 seqs: fills the batch
        GroupSpec("b", [2, 2, 1], 4, 1, 0, 0, None, [None]),  # admitted in the same step
    ]
    res = simulate_and_check(cfg, groups, lag)
    assert res.max_running <= cfg.max_num_seqs, (
        f"{res.max_running} sequences running with max_num_seqs={cfg.max_num_seqs}"
    )


@LAGS
@pytest.mark.parametrize("max_num_seqs", [1, 2])
def test_preempted_fork_does_not_inflate_prefix_cache_stats(max_num_seqs: int, lag: bool) -> None:
    """A sibling restarted from scratch (preempted with 2 seats; with 1 seat it has none at
    fork time and queues) keeps its leader's cached-token count."""
    cfg = SimConfig(1, 4, False, 4, max_num_seqs, True, 4)
    groups = [GroupSpec("g", [0], 3, 2, 0, 0, None, [None, None])]
    res = simulate_and_check(cfg, groups, lag)
    if not lag:  # async timing may or may not preempt; the stats must hold either way
        assert (res.sched.num_preemptions > 0) == (max_num_seqs == 2)
    kv = res.sched.kv
    for seq in res.seqs["g"]:
        assert seq.num_cached_tokens <= seq.num_prompt_tokens, (
            f"{seq.seq_id}: {seq.num_cached_tokens} cached tokens of a "
            f"{seq.num_prompt_tokens}-token prompt"
        )
    assert kv.prefix_hits <= kv.prefix_queries, (kv.prefix_hits, kv.prefix_queries)


def test_no_chunked_prefill_never_splits_a_forked_prefill() -> None:
    cfg = SimConfig(16, 17, False, 17, 4, False, 8)
    groups = [
        GroupSpec("b", [1], 4, 1, 0, 0, None, [None]),  # a decoder ahead of the fork
        GroupSpec("a", [0] * 15, 2, 2, 0, 0, None, [None, None]),
    ]
    chunks: list[tuple[str, int, int]] = []
    orig = Scheduler.schedule

    def spy(self: Scheduler) -> SchedulerOutput:
        out = orig(self)
        for s in out.scheduled:
            seq = self.sequences[s.seq_id]
            chunks.append((s.seq_id, s.num_new_tokens, seq.num_tokens - s.num_computed_tokens))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Scheduler, "schedule", spy)
        simulate_and_check(cfg, groups)
    assert chunks
    split = [c for c in chunks if c[1] != c[2]]
    assert not split, f"(seq, scheduled, remaining) split chunks: {split}"
