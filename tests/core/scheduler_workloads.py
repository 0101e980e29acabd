"""Workloads for the scheduler's simulations, and what their outputs must be.

A workload is a ``SimConfig`` (KV pool, block size, token budget, ``max_num_seqs``, chunked
prefill, prefix caching, scheduling policy) and a list of ``GroupSpec`` requests (arrival
step, prompt, ``max_tokens``, ``n`` sequences, priority, abort step, the output index at which
each sequence samples ``STOP``, seed, repetition penalty); ``workload()`` draws random ones.
``simulate`` runs one through the ``scheduler_harness`` engine loop, synchronously or with
async scheduling, checking every step with ``check_step`` as well as the seat, state and
worker-replica checks, and failing on a deadlock (no progress with sequences pending) or a
livelock (no completion within a bound). ``check_final`` then checks the end state: an empty
scheduler and KV pool, an empty worker replica, a cached-token count of whole prompt blocks,
and every sequence's output (aborted, stopped at its ``STOP``, or ended by length) made of the
tokens sampled at its indices, none lost, doubled or reordered.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from hypothesis import strategies as st

from pagedllm.core.kv_cache_manager import cdiv
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.sequence import Sequence, SequenceStatus
from tests.core.scheduler_harness import (
    STOP,
    Harness,
    Inflight,
    advance,
    make_config,
    make_params,
    scheduler_for,
)
from tests.core.scheduler_invariants import check_state, check_step

# ---- workload description ------------------------------------------------------------------


@dataclass
class GroupSpec:
    """One user request: ``n`` sequences sharing a prompt."""

    gid: str
    prompt: list[int]
    max_tokens: int  # SamplingParams.max_tokens (clipped to the room left by max_model_len)
    n: int
    priority: int
    arrival_step: int
    abort_step: int | None
    stop_at: list[int | None]  # per sequence: output index at which it samples STOP
    clip: bool = True  # clip Sequence.max_tokens like the engine (else the scheduler must)
    seed: int | None = None  # SamplingParams.seed (sequence i gets seed + i, like the engine)
    penalty: bool = False  # repetition_penalty: with async scheduling it waits for its tokens


@dataclass
class SimConfig:
    block_size: int
    max_model_len: int
    chunked: bool
    max_num_batched_tokens: int
    max_num_seqs: int
    prefix_caching: bool
    num_blocks: int
    policy: str = "priority"  # scheduling_policy; the workloads draw priorities 0..2


def effective_max_tokens(g: GroupSpec, max_model_len: int) -> int:
    """What the engine passes as ``Sequence.max_tokens``: clipped to fit the context."""
    return min(g.max_tokens, max_model_len - len(g.prompt))


def blocks_needed(g: GroupSpec, cfg: SimConfig) -> int:
    longest = min(len(g.prompt) + effective_max_tokens(g, cfg.max_model_len), cfg.max_model_len)
    return cdiv(longest, cfg.block_size)


def build_group(g: GroupSpec, max_model_len: int) -> list[Sequence]:
    """The sequences of one group, exactly as ``LLMEngine.add_request`` builds them."""
    params = make_params(
        n=g.n, max_tokens=g.max_tokens, seed=g.seed, repetition_penalty=1.2 if g.penalty else 1.0
    )
    max_tokens = effective_max_tokens(g, max_model_len) if g.clip else g.max_tokens
    seqs = [
        Sequence(
            g.gid if i == 0 else f"{g.gid}#{i}",
            list(g.prompt),
            params,
            max_tokens=max_tokens,
            request_id=g.gid,
            index=i,
            priority=g.priority,
            arrival_time=float(g.arrival_step),
            seed=None if g.seed is None else g.seed + i,
        )
        for i in range(g.n)
    ]
    seqs[0].pending_forks = seqs[1:]
    return seqs


@st.composite
def sim_config(draw: st.DrawFn, chunked: bool | None = None) -> SimConfig:
    bs = draw(st.sampled_from([1, 2, 4, 16]))
    max_model_len = draw(st.integers(2, 40))
    if chunked is None:
        chunked = draw(st.booleans())
    if chunked:
        budget = draw(st.integers(1, 48))
    else:
        budget = draw(st.integers(max_model_len, max_model_len + 24))
    return SimConfig(
        block_size=bs,
        max_model_len=max_model_len,
        chunked=chunked,
        max_num_batched_tokens=budget,
        max_num_seqs=draw(st.integers(1, 6)),
        prefix_caching=draw(st.booleans()),
        num_blocks=0,  # set once the groups are known
        policy=draw(st.sampled_from(["fcfs", "priority"])),
    )


@st.composite
def workload(
    draw: st.DrawFn, chunked: bool | None = None, max_n: int = 3
) -> tuple[SimConfig, list[GroupSpec]]:
    cfg = draw(sim_config(chunked))
    base = draw(st.lists(st.integers(0, 2), min_size=cfg.max_model_len, max_size=cfg.max_model_len))
    groups = []
    for k in range(draw(st.integers(1, 7))):
        plen = draw(st.integers(1, cfg.max_model_len - 1))
        if draw(st.booleans()):  # share a prefix with other requests: prefix-cache hits
            cut = draw(st.integers(0, plen))
            prompt = base[:cut] + draw(
                st.lists(st.integers(0, 2), min_size=plen - cut, max_size=plen - cut)
            )
        else:
            prompt = draw(st.lists(st.integers(0, 2), min_size=plen, max_size=plen))
        n = draw(st.integers(1, max_n))
        groups.append(
            GroupSpec(
                gid=f"g{k}",
                prompt=prompt,
                max_tokens=draw(st.integers(1, cfg.max_model_len)),
                n=n,
                priority=draw(st.integers(0, 2)),
                arrival_step=draw(st.integers(0, 12)),
                abort_step=draw(st.none() | st.integers(0, 30)),
                stop_at=draw(
                    st.lists(st.none() | st.integers(0, cfg.max_model_len), min_size=n, max_size=n)
                ),
                clip=draw(st.booleans()),
                seed=draw(st.none() | st.integers(0, 1000)),
                penalty=draw(st.booleans()),
            )
        )
    need = max(blocks_needed(g, cfg) for g in groups)
    cfg.num_blocks = need + draw(st.integers(0, 6))
    return cfg, groups


def one_context_pool(
    block_size: int, chunked: bool, prefix_caching: bool, max_num_seqs: int, policy: str
) -> SimConfig:
    """A pool of blocks for one whole 24-token context, with a 32-token budget (chunked) or
    one context's worth (not chunked)."""
    max_model_len = 24
    return SimConfig(
        block_size=block_size,
        max_model_len=max_model_len,
        chunked=chunked,
        max_num_batched_tokens=32 if chunked else max_model_len,
        max_num_seqs=max_num_seqs,
        prefix_caching=prefix_caching,
        num_blocks=cdiv(max_model_len, block_size),
        policy=policy,
    )


# ---- the simulation ------------------------------------------------------------------------


@dataclass
class SimResult:
    sched: Scheduler
    harness: Harness
    seqs: dict[str, list[Sequence]]  # gid -> sequences
    aborted: set[str]  # gids aborted while unfinished
    steps: int
    max_running: int


def token_for(seq: Sequence, k: int, stop_at: list[int | None]) -> int:
    """The token ``seq`` samples at output index ``k``."""
    if stop_at[seq.index] == k:
        return STOP
    return (k * 3 + seq.index + len(seq.prompt_token_ids)) % 5


def make_scheduler(cfg: SimConfig) -> Scheduler:
    config = make_config(
        block_size=cfg.block_size,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        enable_chunked_prefill=cfg.chunked,
        enable_prefix_caching=cfg.prefix_caching,
        scheduling_policy=cfg.policy,
    )
    return scheduler_for(config, cfg.num_blocks)


def simulate(cfg: SimConfig, groups: list[GroupSpec], lag: bool = False) -> SimResult:
    """Run the workload to completion: arrivals and aborts at their steps, every step checked."""
    sched = make_scheduler(cfg)
    h = Harness(sched, lag)
    specs = {g.gid: g for g in groups}
    seqs: dict[str, list[Sequence]] = {}
    by_id: dict[str, Sequence] = {}
    aborted: set[str] = set()
    total = sum(g.n * (len(g.prompt) + effective_max_tokens(g, cfg.max_model_len)) for g in groups)
    bound = 12 + 4 * total * (1 + cfg.max_model_len)
    last_arrival = max(g.arrival_step for g in groups)

    def token(sid: str, k: int) -> int:
        seq = by_id[sid]
        return token_for(seq, k, specs[seq.request_id].stop_at)

    step = 0
    max_running = 0
    inflight: Inflight = None
    while step <= last_arrival or sched.has_unfinished_sequences() or inflight is not None:
        for g in groups:
            if g.arrival_step == step:
                seqs[g.gid] = build_group(g, cfg.max_model_len)
                by_id.update((s.seq_id, s) for s in seqs[g.gid])
                sched.add_sequence(seqs[g.gid][0])
            if g.abort_step == step and g.gid in seqs:
                live = [s for s in seqs[g.gid] if not s.is_finished]
                if live:
                    aborted.add(g.gid)
                done = sched.finish_sequences(
                    [s.seq_id for s in seqs[g.gid]], SequenceStatus.FINISHED_ABORTED
                )
                assert {d.seq_id for d in done} == {s.seq_id for s in live}
        check_state(sched, [inflight[0] if inflight else None], lag)
        was_waiting = {r.seq_id for r in sched.waiting}
        check = functools.partial(
            check_step, sched, was_waiting=was_waiting, chunked=cfg.chunked, lag=lag
        )
        out, inflight = advance(h, inflight, token, on_schedule=check)
        assert len(out.scheduled) <= cfg.max_num_seqs
        max_running = max(max_running, len(sched.running))
        step += 1
        assert step < bound, f"no completion after {step} steps (livelock?)"
    h.finish()
    return SimResult(sched, h, seqs, aborted, step, max_running)


def check_final(res: SimResult, cfg: SimConfig, groups: list[GroupSpec]) -> None:
    sched, kv = res.sched, res.sched.kv
    assert not sched.running and not sched.waiting and not sched.sequences
    assert kv.seq_blocks == {} and kv.num_registered == {}
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert kv.pool.num_free_blocks == kv.pool.num_blocks
    assert len(res.harness.replica) == 0
    for g in groups:
        want = effective_max_tokens(g, cfg.max_model_len)
        leader = res.seqs[g.gid][0]
        if leader.num_cached_tokens >= 0:  # what the user is told: whole blocks of the prompt
            assert leader.num_cached_tokens % cfg.block_size == 0
            assert (
                leader.num_cached_tokens <= (len(g.prompt) - 1) // cfg.block_size * cfg.block_size
            )
            if not cfg.prefix_caching:
                assert leader.num_cached_tokens == 0
        for seq in res.seqs[g.gid]:
            assert seq.is_finished, seq.seq_id
            assert not seq.on_worker, seq.seq_id
            assert seq.prompt_token_ids == g.prompt
            assert seq.all_token_ids == g.prompt + seq.output_token_ids
            if seq.status == SequenceStatus.FINISHED_ABORTED:
                assert g.gid in res.aborted, f"{seq.seq_id} aborted without an abort"
                assert len(seq.output_token_ids) <= want
                continue
            stop = g.stop_at[seq.index]
            if stop is not None and stop < want:
                assert seq.status == SequenceStatus.FINISHED_STOPPED
                assert len(seq.output_token_ids) == stop + 1
                assert seq.output_token_ids[-1] == STOP and seq.stop_reason == STOP
            else:
                assert seq.status == SequenceStatus.FINISHED_LENGTH, seq.seq_id
                assert len(seq.output_token_ids) == want, seq.seq_id
                assert STOP not in seq.output_token_ids
            assert seq.num_tokens <= cfg.max_model_len
            # Every token is the one sampled at its index (none lost, doubled or reordered).
            assert seq.output_token_ids == [
                token_for(seq, k, g.stop_at) for k in range(seq.num_output_tokens)
            ]


def simulate_and_check(cfg: SimConfig, groups: list[GroupSpec], lag: bool = False) -> SimResult:
    """``simulate``, then ``check_final``."""
    res = simulate(cfg, groups, lag)
    check_final(res, cfg, groups)
    return res
