"""The scheduler's invariants, checked by the engine loop of ``scheduler_harness`` (and the
simulations of ``scheduler_workloads``) after every ``schedule()`` and every update.

* ``check_state``: the queues and the KV cache agree. A sequence is in ``running`` or in
  ``waiting``, never in both nor twice, and the scheduler knows exactly those; a waiting (or
  preempted) one has computed nothing; only running sequences hold blocks; a sequence has at
  most one sampled token not yet applied (two with async scheduling). Every block's ref count
  is the number of block-table entries naming it, and it is free exactly when that is zero;
  the prefix index maps each hash to a block with that hash. A running sequence's table
  covers its computed tokens with no unused block; a shared block is full of computed tokens;
  a hashed block holds this sequence's tokens under the chained hash; two owners of one block
  agree on its content. Tokens of steps scheduled but not computed yet (``uncomputed``) have
  their blocks but no KV.
* ``check_step``: one ``schedule()`` result keeps the token budget and schedules or preempts
  a sequence at most once, never both; preempted sequences wait without blocks; every span
  ends at its sequence's computed count, samples exactly when it reaches the last token
  (known, or in flight with async scheduling), has a table covering it with no unused block,
  and sends the blocks appended since the worker last saw the table (the whole table on a
  reset); without chunked prefill an admitted prompt is scheduled whole; a step that
  preempts admits nobody.
* ``check_seats``: never more than ``max_num_seqs`` running sequences, counting the seats
  leaders claim for their unforked siblings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from pagedllm.core.block_pool import hash_block
from pagedllm.core.kv_cache_manager import cdiv
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.core.sequence import SequenceStatus


def check_state(
    sched: Scheduler, uncomputed: Iterable[SchedulerOutput | None] = (), lag: bool = False
) -> None:
    """Ownership, ref counts, free list, block-table coverage and shared-block content.

    ``uncomputed``: steps scheduled but not computed yet (the one just scheduled, and with
    async scheduling the one in flight); their spans have their blocks but not their KV.
    """
    # Scheduled tokens count as computed from schedule() on; these are not on the device yet.
    pending: Counter[str] = Counter()
    for out in uncomputed:
        for s in out.scheduled if out else ():
            pending[s.seq_id] += s.num_new_tokens
    kv = sched.kv
    bs = sched.block_size
    pool = kv.pool
    running_ids = {r.seq_id for r in sched.running}
    assert len(running_ids) == len(sched.running), "a sequence is in `running` twice"
    assert not running_ids & {r.seq_id for r in sched.waiting}
    assert set(kv.seq_blocks) == running_ids, "only running sequences may hold blocks"
    for r in sched.running:
        assert r.status == SequenceStatus.RUNNING
        assert sched.sequences[r.seq_id] is r
    for r in sched.waiting:
        assert r.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED)
        assert r.num_computed_tokens == 0
        assert sched.sequences[r.seq_id] is r
    assert len(sched.sequences) == len(sched.running) + len(sched.waiting)
    for r in sched.sequences.values():
        assert 0 <= r.num_pending <= (2 if lag else 1), (r.seq_id, r.num_pending)
    # Ownership: one reference per block-table entry, so sum(ownership) == sum(ref_cnt).
    owners = Counter(b.block_id for blocks in kv.seq_blocks.values() for b in blocks)
    assert sum(owners.values()) == sum(b.ref_cnt for b in pool.blocks)
    for b in pool.blocks:
        assert b.ref_cnt == owners.get(b.block_id, 0), f"block {b.block_id} ref count"
        assert (b.ref_cnt == 0) == (b.block_id in pool.free)
    for h, b in pool.cached.items():
        assert b.block_hash == h
    # Coverage and shared content.
    seen: dict[int, tuple[int, list[int]]] = {}
    for r in sched.running:
        blocks = kv.seq_blocks[r.seq_id]
        computed = r.num_computed_tokens - pending[r.seq_id]
        assert len(blocks) * bs >= computed, "table does not cover computed tokens"
        want = cdiv(r.num_computed_tokens, bs)
        assert len(blocks) == want, "table holds unused blocks"
        assert computed < r.num_tokens
        assert r.num_computed_tokens < r.num_tokens_with_pending
        for i, b in enumerate(blocks):
            if b.ref_cnt > 1:  # shared: must be full of computed tokens for every owner
                assert (i + 1) * bs <= computed, "a shared block is still written"
            if b.block_hash is not None:  # indexed content must be this sequence's content
                assert (i + 1) * bs <= computed
                parent = None if i == 0 else hash_block_chain(r.all_token_ids, i, bs)
                assert b.block_hash == hash_block(parent, r.all_token_ids[i * bs : (i + 1) * bs])
            content = r.all_token_ids[: (i + 1) * bs]
            if b.block_id in seen:
                assert seen[b.block_id] == (i, content), "two owners disagree on a block"
            seen[b.block_id] = (i, content)


def hash_block_chain(tokens: list[int], nblocks: int, bs: int) -> bytes | None:
    h: bytes | None = None
    for i in range(nblocks):
        h = hash_block(h, tokens[i * bs : (i + 1) * bs])
    return h


def check_step(
    sched: Scheduler, out: SchedulerOutput, was_waiting: set[str], chunked: bool, lag: bool
) -> None:
    """Per-step properties of one ``schedule()`` result (before any update)."""
    bs = sched.block_size
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    ids = [s.seq_id for s in out.scheduled]
    assert len(ids) == len(set(ids)), "a sequence was scheduled twice in one step"
    preempted = set(out.preempted_seq_ids)
    assert len(preempted) == len(out.preempted_seq_ids), "a sequence was preempted twice"
    assert not preempted & set(ids), "a sequence was both scheduled and preempted"
    for sid in out.preempted_seq_ids:
        seq = sched.sequences[sid]
        assert seq.status == SequenceStatus.PREEMPTED and seq in sched.waiting
        assert sid not in sched.kv.seq_blocks
    for s in out.scheduled:
        seq = sched.sequences[s.seq_id]
        assert seq.status == SequenceStatus.RUNNING and seq in sched.running
        assert s.num_new_tokens >= 1
        assert s.end == seq.num_computed_tokens
        if s.samples:  # the span reaches the last token (known or in flight)
            assert s.end == seq.num_tokens_with_pending - 1
        else:
            assert s.end < seq.num_tokens_with_pending
        if not lag:
            assert s.end <= seq.num_tokens
        kv_ids = sched.kv.block_ids(s.seq_id)
        assert len(kv_ids) * bs >= s.end
        assert len(kv_ids) == cdiv(s.end, bs)
        if s.reset_blocks:
            assert s.block_ids == kv_ids
        else:  # the blocks appended since the worker last saw the table
            assert kv_ids[len(kv_ids) - len(s.block_ids) :] == s.block_ids
        if not chunked and s.seq_id in was_waiting:  # admitted: whole prefill at once
            assert s.samples
    if out.preempted_seq_ids:  # nobody is admitted in a step that preempts
        assert not set(ids) & was_waiting


def check_seats(sched: Scheduler) -> None:
    """Never more than ``max_num_seqs`` running sequences, whatever n, forks or preemption;
    the seats leaders claim for their unforked siblings (capped) fit as well."""
    cap = sched.max_num_seqs
    assert len(sched.running) <= cap, f"{len(sched.running)} running, max_num_seqs={cap}"
    assert sum(min(1 + len(r.pending_forks), cap) for r in sched.running) <= cap
