"""The step contract between the `Scheduler` and the worker: what a step sends (new
sequences once, with the leader's first token for forked siblings; the tokens and blocks
appended since), what ``update_from_output`` keeps of multi-token outputs, sequences whose
penalties read host tokens waiting under async scheduling, and a reused id not taking the
tokens of a step still in flight. Every step also goes, pickled, to the worker replica of
``scheduler_harness``, which checks it against the scheduler.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from pagedllm.core.sequence import Sequence, SequenceStatus
from tests.core.scheduler_harness import (
    CHUNKED,
    LAGS,
    STOP,
    Harness,
    drive,
    make_config,
    make_params,
    scheduled_steps,
    scheduler_for,
    seats_sched,
    spans_of,
)
from tests.core.scheduler_workloads import GroupSpec, build_group


@LAGS
def test_penalty_sequence_waits_for_its_token_under_async_lag(lag: bool) -> None:
    """With async scheduling a sequence with a repetition penalty is held back on the step
    right after each one it samples in (its token is still on the device, and the penalty
    reads it on the host), while a plain sequence in the same batch runs every step."""
    h = Harness(seats_sched(max_num_seqs=2), lag)
    pen = Sequence("pen", [0, 1, 2], make_params(max_tokens=6, repetition_penalty=1.2), 6)
    plain = Sequence("plain", [2, 1], make_params(max_tokens=6), 6)
    assert pen.params.needs_host_tokens and not plain.params.needs_host_tokens
    h.sched.add_sequence(pen)
    h.sched.add_sequence(plain)
    drive(h, token_fn=lambda sid, k: k % 5)
    for seq in (pen, plain):
        assert seq.status == SequenceStatus.FINISHED_LENGTH
        assert seq.output_token_ids == [k % 5 for k in range(6)]
    pen_steps, plain_steps = scheduled_steps(h, "pen"), scheduled_steps(h, "plain")
    assert plain_steps == list(range(6)), "the plain sequence must run every step"
    if lag:
        assert pen_steps == [0, 2, 4, 6, 8, 10]
    else:
        assert pen_steps == list(range(6))
    for j, i in enumerate(pen_steps):  # the j-th output; never fed a token the host lacks
        (span,) = [s for s in h.history[i].scheduled if s.seq_id == "pen"]
        assert span.samples and span.end == pen.num_prompt_tokens + j
        assert span.num_new_tokens == (3 if j == 0 else 1)
        assert span.new_token_ids == ([] if j == 0 else [(j - 1) % 5])
    for i in plain_steps[1:]:  # async: its input is the token still on the device
        (span,) = [s for s in h.history[i].scheduled if s.seq_id == "plain"]
        learnt = i - 1 - lag  # the output the host learnt since the previous step
        assert span.num_new_tokens == 1 and span.samples
        assert span.new_token_ids == ([] if learnt < 0 else [learnt % 5])


def test_multi_token_outputs_are_appended_and_truncated_at_the_end() -> None:
    """update_from_output takes any number of tokens per sequence: all are appended (and
    computed next step), and a stop token, max_tokens or max_model_len in the middle ends the
    sequence there, dropping the rest."""
    h = Harness(seats_sched(max_num_seqs=4))
    sched = h.sched
    a = Sequence("a", [0, 1, 2], make_params(max_tokens=5), 5)  # ends by max_tokens
    b = Sequence("b", [1, 2], make_params(max_tokens=10), 10)  # ends on STOP
    c = Sequence("c", [2] * 29, make_params(max_tokens=10), 10)  # ends at max_model_len (32)
    d = Sequence("d", [0, 0], make_params(max_tokens=10), 10)  # goes on
    for seq in (a, b, c, d):
        sched.add_sequence(seq)
    out, sampled = h.step(lambda sid, k: [10 + k, 11 + k])
    assert all(seq.num_pending == 1 for seq in (a, b, c, d))
    changed = h.update(out, sampled)
    assert [(seq.seq_id, kept) for seq, kept in changed] == [(s, [10, 11]) for s in "abcd"]
    for seq in (a, b, c, d):
        assert seq.output_token_ids == [10, 11] and seq.num_pending == 0
        assert seq.num_tokens == seq.num_prompt_tokens + 2
        assert seq.num_computed_tokens == seq.num_prompt_tokens
        assert not seq.is_finished
    # Both new tokens are computed next step, and the worker learns both.
    second = {"a": [1, 2, 3, 4], "b": [5, STOP, 6], "c": [7, 8, 9], "d": [3, 4]}
    out, sampled = h.step(lambda sid, k: second[sid])
    assert [(s.seq_id, s.num_new_tokens, s.new_token_ids) for s in out.scheduled] == [
        (sid, 2, [10, 11]) for sid in "abcd"
    ]
    assert all(s.sample_seq_ids == [s.seq_id] for s in out.scheduled)
    changed = h.update(out, sampled)
    kept = {seq.seq_id: toks for seq, toks in changed}
    assert kept == {"a": [1, 2, 3], "b": [5, STOP], "c": [7], "d": [3, 4]}
    assert a.status == SequenceStatus.FINISHED_LENGTH and a.output_token_ids == [10, 11, 1, 2, 3]
    assert b.status == SequenceStatus.FINISHED_STOPPED and b.stop_reason == STOP
    assert b.output_token_ids == [10, 11, 5, STOP]
    assert c.status == SequenceStatus.FINISHED_LENGTH and c.num_tokens == 32
    assert c.output_token_ids == [10, 11, 7]
    assert d.output_token_ids == [10, 11, 3, 4] and not d.is_finished
    assert all(seq.num_pending == 0 for seq in (a, b, c, d))
    assert list(sched.sequences) == ["d"]
    # The finished ones are reported to the worker with the next step, which computes d's two.
    out, sampled = h.step(lambda sid, k: [4] * 8)
    assert sorted(out.finished_seq_ids) == ["a", "b", "c"]
    assert [(s.seq_id, s.num_new_tokens, s.new_token_ids) for s in out.scheduled] == [
        ("d", 2, [3, 4])
    ]
    assert set(h.replica.seqs) == {"d"}
    changed = h.update(out, sampled)
    assert [(seq.seq_id, toks) for seq, toks in changed] == [("d", [4] * 6)]
    assert d.status == SequenceStatus.FINISHED_LENGTH and d.num_output_tokens == 10
    assert d.num_pending == 0
    assert h.finish().finished_seq_ids == ["d"]
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


@LAGS
@CHUNKED
@pytest.mark.parametrize("max_num_seqs", [2, 4])
def test_forked_siblings_are_sent_once_with_the_leaders_first_token(
    max_num_seqs: int, chunked: bool, lag: bool
) -> None:
    """n > 1: the siblings reach the worker exactly once, in the step whose span samples the
    leader's first token (not with its earlier prompt chunks), and are sampled from that
    span's row; those that found no seat are later admitted without being sent again."""
    config = make_config(
        block_size=4,
        max_model_len=32,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=4 if chunked else 32,
        enable_chunked_prefill=chunked,
    )
    h = Harness(scheduler_for(config, 64), lag)
    other = build_group(GroupSpec("o", [1, 2], 4, 1, 0, 0, None, [None]), 32)
    group = build_group(GroupSpec("a", [0, 1, 2] * 3 + [0], 3, 4, 0, 1, None, [None] * 4), 32)
    h.sched.add_sequence(other[0])
    h.sched.add_sequence(group[0])
    drive(h)
    sent_at: defaultdict[str, list[int]] = defaultdict(list)
    for i, out in enumerate(h.history):
        for new in out.new_sequences:
            sent_at[new.seq_id].append(i)
    leader_spans = spans_of(h, "a")
    firsts = [(i, s) for i, s in leader_spans if s.samples and s.end == 10]
    assert len(firsts) == 1
    step, span = firsts[0]
    ids = [s.seq_id for s in group]
    assert span.sample_seq_ids == ids
    assert sent_at["a"] == [leader_spans[0][0]]
    if chunked:  # the prompt took several steps; the siblings came with the last one only
        assert leader_spans[0][0] < step
    for child in group[1:]:
        assert sent_at[child.seq_id] == [step], child.seq_id
        assert child.status == SequenceStatus.FINISHED_LENGTH
        assert child.output_token_ids == [1, 1, 1]
        spans = [s for _, s in spans_of(h, child.seq_id)]
        assert spans[0].reset_blocks  # its first table: shared with the leader, or its own
        assert spans[0].new_token_ids == [1]  # the worker learns its first token
        assert spans[0].num_computed_tokens in (0, 8)  # from scratch, or 2 shared blocks
    # Seated at the fork: computed in the next step (with async, the one after: the fork
    # lands after it was scheduled). With 2 seats one sibling is seated, two queue.
    queued = [c for c in group[1:] if scheduled_steps(h, c.seq_id)[0] > step + 1 + lag]
    if max_num_seqs == 2:
        assert len(queued) == 2
    elif not chunked:  # (a 4-token budget may hold a seated sibling back a step)
        assert not queued
    assert sorted(sent_at) == sorted([*ids, "o"])


def test_reused_id_does_not_take_the_results_of_a_step_in_flight() -> None:
    """Async: "x" finishes on a stop token while the step that ran ahead with it is in
    flight; a new sequence may then take the id "x" (the engine frees it once the request's
    output is finished), but the old step's token must not land in it."""
    h = Harness(seats_sched(max_num_seqs=4), lag=True)
    sched = h.sched
    old = Sequence("x", [0, 1], make_params(max_tokens=10), 10)
    sched.add_sequence(old)
    out0, _ = h.step()
    out1, sampled1 = h.step()  # runs ahead on the token of out0
    h.update(out0, {"x": [STOP]})
    assert old.status == SequenceStatus.FINISHED_STOPPED and not sched.has_unfinished_sequences()
    new = Sequence("x", [2, 2, 2], make_params(max_tokens=10), 10)
    sched.add_sequence(new)
    out2, sampled2 = h.step()
    assert out2.finished_seq_ids == ["x"] and [n.seq_id for n in out2.new_sequences] == ["x"]
    sched.update_from_output(out1, sampled1)  # the old sequence's step: not for `new`
    assert new.output_token_ids == [] and new.num_pending == 1
    sched.update_from_output(out2, sampled2)
    assert new.output_token_ids == [1] and new.num_pending == 0
