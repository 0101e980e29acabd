"""Property-based tests of the token-budget `Scheduler`, driven without a model.

A simulated engine loop calls ``schedule()``, fabricates one sampled token for every sequence
whose chunk reaches its last token (the request and its ``pending_forks``), and feeds it back
with ``update_from_output``. Random workloads (arrival times, prompt lengths, ``max_tokens``,
``n`` in 1..3, priorities, aborts, stop tokens) run against random small KV pools, block sizes
and token budgets, with and without chunked prefill and prefix caching. Every step is checked
against the scheduler's invariants, and every request's final output against what it must be.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pagedllm.config import EngineConfig
from pagedllm.core.block_pool import hash_block
from pagedllm.core.kv_cache_manager import cdiv
from pagedllm.core.request import Request, RequestStatus
from pagedllm.core.scheduler import Scheduler, SchedulerOutput
from pagedllm.sampling_params import SamplingParams

STOP = 99  # the stop token; fabricated ordinary tokens are in 0..4, prompts in 0..2


@functools.lru_cache(maxsize=1)
def model_dir() -> str:
    """A throwaway model directory holding only a tiny Llama ``config.json``."""
    path = Path(tempfile.mkdtemp(prefix="pagedllm-sched-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
    }
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def make_config(**kw: object) -> EngineConfig:
    return EngineConfig(model=model_dir(), device="cpu", **kw)  # type: ignore[arg-type]


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
    clip: bool = True  # clip Request.max_tokens like the engine (else the scheduler must)


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
    """What the engine passes as ``Request.max_tokens``: clipped to fit the context."""
    return min(g.max_tokens, max_model_len - len(g.prompt))


def blocks_needed(g: GroupSpec, cfg: SimConfig) -> int:
    longest = min(len(g.prompt) + effective_max_tokens(g, cfg.max_model_len), cfg.max_model_len)
    return cdiv(longest, cfg.block_size)


def build_group(g: GroupSpec, max_model_len: int) -> list[Request]:
    """The sequences of one group, exactly as ``LLMEngine.add_request`` builds them."""
    params = SamplingParams(n=g.n, max_tokens=g.max_tokens, ignore_eos=True, stop_token_ids=[STOP])
    params.update_from_generation_config(set())
    max_tokens = effective_max_tokens(g, max_model_len) if g.clip else g.max_tokens
    seqs = [
        Request(
            g.gid if i == 0 else f"{g.gid}#{i}",
            list(g.prompt),
            params,
            max_tokens=max_tokens,
            group_id=g.gid,
            index=i,
            priority=g.priority,
            arrival_time=float(g.arrival_step),
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
            )
        )
    need = max(blocks_needed(g, cfg) for g in groups)
    cfg.num_blocks = need + draw(st.integers(0, 6))
    return cfg, groups


# ---- invariants ----------------------------------------------------------------------------


def check_state(sched: Scheduler, out: SchedulerOutput | None = None) -> None:
    """Ownership, ref counts, free list, block-table coverage and shared-block content.

    ``out``: the step just scheduled and not yet computed (its chunks have their blocks).
    """
    # Scheduled tokens count as computed from schedule() on; these are not on the device yet.
    pending = {s.request.request_id: s.num_new_tokens for s in out.scheduled} if out else {}
    kv = sched.kv
    bs = sched.block_size
    pool = kv.pool
    running_ids = {r.request_id for r in sched.running}
    assert len(running_ids) == len(sched.running), "a request is in `running` twice"
    assert not running_ids & {r.request_id for r in sched.waiting}
    assert set(kv.req_blocks) == running_ids, "only running requests may hold blocks"
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.num_computed_tokens == 0
    # Ownership: one reference per block-table entry, so sum(ownership) == sum(ref_cnt).
    owners = Counter(b.block_id for blocks in kv.req_blocks.values() for b in blocks)
    assert sum(owners.values()) == sum(b.ref_cnt for b in pool.blocks)
    for b in pool.blocks:
        assert b.ref_cnt == owners.get(b.block_id, 0), f"block {b.block_id} ref count"
        assert (b.ref_cnt == 0) == (b.block_id in pool.free)
    for h, b in pool.cached.items():
        assert b.block_hash == h
    # Coverage and shared content.
    seen: dict[int, tuple[int, list[int]]] = {}
    for r in sched.running:
        blocks = kv.req_blocks[r.request_id]
        computed = r.num_computed_tokens - pending.get(r.request_id, 0)
        assert len(blocks) * bs >= computed, "table does not cover computed tokens"
        want = cdiv(r.num_computed_tokens, bs)
        assert len(blocks) == want, "table holds unused blocks"
        assert computed < r.num_tokens
        for i, b in enumerate(blocks):
            if b.ref_cnt > 1:  # shared: must be full of computed tokens for every owner
                assert (i + 1) * bs <= computed, "a shared block is still written"
            if b.block_hash is not None:  # indexed content must be this request's content
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
    sched: Scheduler, out: SchedulerOutput, was_waiting: set[str], chunked: bool
) -> None:
    """Per-step properties of one ``schedule()`` result."""
    bs = sched.block_size
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    ids = [s.request.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids)), "a request was scheduled twice in one step"
    preempted = {r.request_id for r in out.preempted}
    assert not preempted & set(ids), "a request was both scheduled and preempted"
    for r in out.preempted:
        assert r.status == RequestStatus.PREEMPTED and r in sched.waiting
        assert r.request_id not in sched.kv.req_blocks
    for s in out.scheduled:
        req = s.request
        assert req.status == RequestStatus.RUNNING and req in sched.running
        assert s.num_new_tokens >= 1
        assert s.end == req.num_computed_tokens <= req.num_tokens
        assert s.block_ids == sched.kv.block_ids(req.request_id)
        assert len(s.block_ids) * bs >= s.end
        assert len(s.block_ids) == cdiv(s.end, bs)
        if not chunked and req.request_id in was_waiting:  # admitted: whole prefill at once
            assert s.samples
    if out.preempted:  # nobody is admitted in a step that preempts
        assert not set(ids) & was_waiting


def check_seats(sched: Scheduler) -> None:
    """Never more than ``max_num_seqs`` running sequences, whatever n, forks or preemption;
    the seats leaders claim for their unforked siblings (capped) fit as well."""
    cap = sched.max_num_seqs
    assert len(sched.running) <= cap, f"{len(sched.running)} running, max_num_seqs={cap}"
    assert sum(min(1 + len(r.pending_forks), cap) for r in sched.running) <= cap


# ---- the simulation ------------------------------------------------------------------------


@dataclass
class SimResult:
    sched: Scheduler
    seqs: dict[str, list[Request]]  # gid -> sequences
    aborted: set[str]  # gids aborted while unfinished
    steps: int
    max_running: int


def token_for(seq: Request, stop_at: list[int | None]) -> int:
    k = seq.num_output_tokens
    if stop_at[seq.index] == k:
        return STOP
    return (k * 3 + seq.index + len(seq.prompt_token_ids)) % 5


def simulate(cfg: SimConfig, groups: list[GroupSpec]) -> SimResult:
    config = make_config(
        block_size=cfg.block_size,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        enable_chunked_prefill=cfg.chunked,
        enable_prefix_caching=cfg.prefix_caching,
        scheduling_policy=cfg.policy,
    )
    sched = Scheduler(config, cfg.num_blocks)
    specs = {g.gid: g for g in groups}
    seqs: dict[str, list[Request]] = {}
    aborted: set[str] = set()
    total = sum(g.n * (len(g.prompt) + effective_max_tokens(g, cfg.max_model_len)) for g in groups)
    bound = 12 + 4 * total * (1 + cfg.max_model_len)
    last_arrival = max(g.arrival_step for g in groups)
    step = 0
    max_running = 0
    while step <= last_arrival or sched.has_unfinished_requests():
        for g in groups:
            if g.arrival_step == step:
                seqs[g.gid] = build_group(g, cfg.max_model_len)
                sched.add_request(seqs[g.gid][0])
            if g.abort_step == step and g.gid in seqs:
                live = [s for s in seqs[g.gid] if not s.is_finished]
                if live:
                    aborted.add(g.gid)
                done = sched.finish_requests(
                    [s.request_id for s in seqs[g.gid]], RequestStatus.FINISHED_ABORTED
                )
                assert {d.request_id for d in done} == {s.request_id for s in live}
        check_state(sched)
        was_waiting = {r.request_id for r in sched.waiting}
        out = sched.schedule()
        check_seats(sched)
        if sched.has_unfinished_requests():
            assert out.scheduled, "no progress with requests pending (deadlock)"
        check_step(sched, out, was_waiting, cfg.chunked)
        check_state(sched, out)
        sampled = {}
        for s in out.scheduled:
            if s.samples:
                for seq in (s.request, *s.request.pending_forks):
                    sampled[seq.request_id] = token_for(seq, specs[seq.group_id].stop_at)
        changed = sched.update_from_output(out, sampled)
        assert {c.request_id for c in changed} == set(sampled)
        max_running = max(max_running, len(sched.running))
        assert len(out.scheduled) <= cfg.max_num_seqs
        check_seats(sched)  # forks too: siblings without a seat wait
        check_state(sched)
        step += 1
        assert step < bound, f"no completion after {step} steps (livelock?)"
    return SimResult(sched, seqs, aborted, step, max_running)


def check_final(res: SimResult, cfg: SimConfig, groups: list[GroupSpec]) -> None:
    sched, kv = res.sched, res.sched.kv
    assert not sched.running and not sched.waiting and not sched.requests
    assert kv.req_blocks == {} and kv.num_registered == {}
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert kv.pool.num_free_blocks == kv.pool.num_blocks
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
            assert seq.is_finished, seq.request_id
            assert seq.prompt_token_ids == g.prompt
            assert seq.all_token_ids == g.prompt + seq.output_token_ids
            if seq.status == RequestStatus.FINISHED_ABORTED:
                assert g.gid in res.aborted, f"{seq.request_id} aborted without an abort"
                assert len(seq.output_token_ids) <= want
                continue
            stop = g.stop_at[seq.index]
            if stop is not None and stop < want:
                assert seq.status == RequestStatus.FINISHED_STOPPED
                assert len(seq.output_token_ids) == stop + 1
                assert seq.output_token_ids[-1] == STOP and seq.stop_reason == STOP
            else:
                assert seq.status == RequestStatus.FINISHED_LENGTH, seq.request_id
                assert len(seq.output_token_ids) == want, seq.request_id
                assert STOP not in seq.output_token_ids
            assert seq.num_tokens <= cfg.max_model_len


@settings(max_examples=250, deadline=None)
@given(wl=workload())
def test_random_workloads_keep_invariants_and_finish(
    wl: tuple[SimConfig, list[GroupSpec]],
) -> None:
    cfg, groups = wl
    res = simulate(cfg, groups)
    check_final(res, cfg, groups)
    kv = res.sched.kv
    event(f"preempted: {res.sched.num_preemptions > 0}")
    event(f"prefix hits: {kv.prefix_hits > 0}")
    event(f"aborted: {bool(res.aborted)}")
    event(f"forked: {any(g.n > 1 for g in groups)}")
    statuses = {s.status for seqs in res.seqs.values() for s in seqs}
    event(f"stopped: {RequestStatus.FINISHED_STOPPED in statuses}")
    event(f"n > max_num_seqs: {any(g.n > cfg.max_num_seqs for g in groups)}")
    assert res.max_running <= cfg.max_num_seqs


@settings(max_examples=60, deadline=None)
@given(wl=workload(max_n=1))
def test_single_sequence_requests_respect_max_num_seqs(
    wl: tuple[SimConfig, list[GroupSpec]],
) -> None:
    cfg, groups = wl
    res = simulate(cfg, groups)
    check_final(res, cfg, groups)
    assert res.max_running <= cfg.max_num_seqs


@settings(max_examples=80, deadline=None)
@given(wl=workload(chunked=False))
def test_random_workloads_without_chunked_prefill(
    wl: tuple[SimConfig, list[GroupSpec]],
) -> None:
    cfg, groups = wl
    check_final(simulate(cfg, groups), cfg, groups)


# ---- preemption ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_tiny_pool_preempts_and_still_finishes(
    chunked: bool, prefix_caching: bool, block_size: int
) -> None:
    """Many long requests on a pool that fits exactly one: preemption must kick in."""
    max_model_len = 24
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
    cfg = SimConfig(
        block_size=block_size,
        max_model_len=max_model_len,
        chunked=chunked,
        max_num_batched_tokens=32 if chunked else max_model_len,
        max_num_seqs=8,
        prefix_caching=prefix_caching,
        num_blocks=0,
    )
    cfg.num_blocks = max(blocks_needed(g, cfg) for g in groups)
    res = simulate(cfg, groups)
    check_final(res, cfg, groups)
    assert res.sched.num_preemptions > 0
    preempted = [s for g in groups for s in res.seqs[g.gid] if s.num_preemptions > 0]
    assert preempted
    for seq in preempted:  # recomputed from scratch (or the cache) and still complete
        g = groups[int(seq.group_id[1:])]
        assert seq.status == RequestStatus.FINISHED_LENGTH
        assert len(seq.output_token_ids) == effective_max_tokens(g, max_model_len)


# ---- admission limits and configuration --------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    bs=st.sampled_from([1, 2, 4, 16]),
    max_model_len=st.integers(2, 64),
    data=st.data(),
)
def test_add_request_rejects_requests_that_can_never_fit(
    bs: int, max_model_len: int, data: st.DataObject
) -> None:
    plen = data.draw(st.integers(1, max_model_len - 1))
    max_tokens = data.draw(st.integers(1, 2 * max_model_len))
    g = GroupSpec("g", [1] * plen, max_tokens, 1, 0, 0, None, [None])
    cfg = SimConfig(bs, max_model_len, True, 8, 4, True, 0)
    need = blocks_needed(g, cfg)
    num_blocks = data.draw(st.integers(1, need + 2))
    sched = Scheduler(
        make_config(block_size=bs, max_model_len=max_model_len, max_num_batched_tokens=8),
        num_blocks,
    )
    req = build_group(g, max_model_len)[0]
    if need > num_blocks:
        with pytest.raises(ValueError):
            sched.add_request(req)
        assert not sched.has_unfinished_requests() and not sched.waiting
    else:
        sched.add_request(req)
        assert sched.waiting == [req]
        with pytest.raises(ValueError):  # request ids are unique
            sched.add_request(build_group(g, max_model_len)[0])


def test_chunked_prefill_off_needs_budget_for_a_whole_context() -> None:
    with pytest.raises(ValueError):
        make_config(max_model_len=32, max_num_batched_tokens=31, enable_chunked_prefill=False)
    make_config(max_model_len=32, max_num_batched_tokens=32, enable_chunked_prefill=False)
    make_config(max_model_len=32, max_num_batched_tokens=1, enable_chunked_prefill=True)
    with pytest.raises(ValueError):
        make_config(max_model_len=32, max_num_batched_tokens=0)


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
    sched.add_request(second)
    out = sched.schedule()
    assert [s.request for s in out.scheduled] == [second]
    want = (len(prompt) - 1) // bs * bs
    assert second.num_cached_tokens == want
    assert sched.kv.prefix_hits == want
    assert sched.kv.prefix_queries == 2 * len(prompt)
    assert out.scheduled[0].num_new_tokens == min(len(prompt) - want, budget)


def test_prefix_hit_needs_same_leading_blocks() -> None:
    """Same second block after a different first block: the chained hash must not hit."""
    cfg = SimConfig(4, 32, True, 64, 4, True, 16)
    a = GroupSpec("a", [0, 0, 0, 0, 1, 2, 1, 2, 0], 1, 1, 0, 0, None, [None])
    b = GroupSpec("b", [1, 1, 1, 1, 1, 2, 1, 2, 0], 1, 1, 0, 0, None, [None])
    res = simulate(cfg, [a])
    req = build_group(b, cfg.max_model_len)[0]
    res.sched.add_request(req)
    res.sched.schedule()
    assert req.num_cached_tokens == 0


# ---- regressions: bugs these tests found, since fixed ------------------------------------


def test_forks_of_running_leaders_respect_max_num_seqs() -> None:
    """Regression (fixed in 497031c): pending siblings of running leaders count as running."""
    cfg = SimConfig(4, 32, True, 64, 3, False, 32)
    groups = [
        GroupSpec("a", [0, 1, 2, 0, 1], 4, 3, 0, 0, None, [None] * 3),  # 3 seqs: fills the batch
        GroupSpec("b", [2, 2, 1], 4, 1, 0, 0, None, [None]),  # admitted in the same step
    ]
    res = simulate(cfg, groups)
    check_final(res, cfg, groups)
    assert res.max_running <= cfg.max_num_seqs, (
        f"{res.max_running} sequences running with max_num_seqs={cfg.max_num_seqs}"
    )


@pytest.mark.parametrize("max_num_seqs", [1, 2])
def test_preempted_fork_does_not_inflate_prefix_cache_stats(max_num_seqs: int) -> None:
    """A sibling restarted from scratch (preempted with 2 seats; with 1 seat it has none at
    fork time and queues) keeps its leader's cached-token count."""
    cfg = SimConfig(1, 4, False, 4, max_num_seqs, True, 4)
    groups = [GroupSpec("g", [0], 3, 2, 0, 0, None, [None, None])]
    res = simulate(cfg, groups)
    check_final(res, cfg, groups)
    assert (res.sched.num_preemptions > 0) == (max_num_seqs == 2)
    kv = res.sched.kv
    for seq in res.seqs["g"]:
        assert seq.num_cached_tokens <= seq.num_prompt_tokens, (
            f"{seq.request_id}: {seq.num_cached_tokens} cached tokens of a "
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
            r = s.request
            chunks.append((r.request_id, s.num_new_tokens, r.num_tokens - s.start))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Scheduler, "schedule", spy)
        res = simulate(cfg, groups)
    check_final(res, cfg, groups)
    split = [c for c in chunks if c[1] != c[2]]
    assert not split, f"(seq, scheduled, remaining) split chunks: {split}"


# ---- seats: n > max_num_seqs, fork queueing, scheduling policy ---------------------------


def drive(
    sched: Scheduler,
    lag: bool = False,
    on_step: Callable[[int], None] | None = None,
    max_steps: int = 2000,
) -> dict[str, tuple[int, int]]:
    """Run ``sched`` to completion, fabricating token 1 for every sampled sequence; with
    ``lag`` each step is scheduled before the previous one's tokens are applied (async
    scheduling). ``on_step(step)`` runs before each schedule (arrivals). Checks the seat
    invariants after every schedule and update. Returns when each sequence was first scheduled:
    (step, position in that step; admissions come after the running requests, in order).
    """
    inflight: tuple[SchedulerOutput, dict[str, int]] | None = None
    first: dict[str, tuple[int, int]] = {}
    for step in range(max_steps):
        if on_step is not None:
            on_step(step)
        if not sched.has_unfinished_requests() and inflight is None:
            return first
        out = sched.schedule()
        check_seats(sched)
        for i, s in enumerate(out.scheduled):
            first.setdefault(s.request.request_id, (step, i))
        # The device samples for the leader and its unforked siblings (as the runner does).
        sampled = {
            seq.request_id: 1
            for s in out.scheduled
            if s.samples
            for seq in (s.request, *s.request.pending_forks)
        }
        if inflight is not None:
            sched.update_from_output(*inflight)
            check_seats(sched)
            inflight = None
        elif sched.has_unfinished_requests():
            assert out.scheduled, "no progress with requests pending (deadlock)"
        if lag:
            inflight = (out, sampled) if out.scheduled else None
        else:
            sched.update_from_output(out, sampled)
            check_seats(sched)
    raise AssertionError(f"no completion after {max_steps} steps")


def seats_sched(max_num_seqs: int, num_blocks: int = 64, **kw: object) -> Scheduler:
    config = make_config(
        block_size=4, max_model_len=32, max_num_seqs=max_num_seqs, max_num_batched_tokens=64, **kw
    )
    return Scheduler(config, num_blocks)


def test_siblings_beyond_the_free_seats_wait_in_the_queue() -> None:
    """n=8 with max_num_seqs=2: the leader claims 2 seats, forks one sibling into the batch
    and queues the other six; all eight finish, never more than two at once."""
    sched = seats_sched(max_num_seqs=2)
    seqs = build_group(GroupSpec("a", [0, 1, 2, 0, 1], 5, 8, 0, 0, None, [None] * 8), 32)
    sched.add_request(seqs[0])
    out = sched.schedule()
    assert [(s.request, s.samples) for s in out.scheduled] == [(seqs[0], True)]
    sched.update_from_output(out, {s.request_id: 1 for s in seqs})
    assert sched.running == seqs[:2]
    assert sched.waiting == seqs[2:]
    for child in seqs[2:]:  # starts from scratch later, its first token already sampled
        assert child.status == RequestStatus.WAITING and child.num_computed_tokens == 0
        assert child.output_token_ids == [1] and sched.kv.block_ids(child.request_id) == []
    assert sched.kv.block_ids(seqs[1].request_id)[:1] == sched.kv.block_ids("a")[:1]  # shared
    drive(sched)
    for seq in seqs:
        assert seq.status == RequestStatus.FINISHED_LENGTH and seq.output_token_ids == [1] * 5
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


@pytest.mark.parametrize("lag", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("max_num_seqs", [1, 2, 3])
def test_big_n_does_not_starve_or_deadlock_others(max_num_seqs: int, lag: bool) -> None:
    """An n=8 group between a running request and a later one: everything finishes, and a
    higher-priority request arriving while siblings queue takes the next free seat."""
    sched = seats_sched(max_num_seqs, scheduling_policy="priority")
    ahead = build_group(GroupSpec("ahead", [2, 2, 1], 9, 1, 1, 0, None, [None]), 32)
    big = build_group(GroupSpec("big", [0, 1, 2, 0, 1], 4, 8, 1, 0, None, [None] * 8), 32)
    after = build_group(GroupSpec("after", [1, 0], 3, 1, 1, 0, None, [None]), 32)
    urgent = build_group(GroupSpec("urgent", [1, 1], 3, 1, 0, 0, None, [None]), 32)
    for g in (ahead, big, after):
        sched.add_request(g[0])
    queued: list[Request] = []

    def arrive(step: int) -> None:
        if not queued and any(s in sched.waiting for s in big[1:]):
            queued.extend(s for s in big[1:] if s in sched.waiting)
            sched.add_request(urgent[0])

    first = drive(sched, lag=lag, on_step=arrive)
    for seq in ahead + big + after + urgent:
        assert seq.status == RequestStatus.FINISHED_LENGTH, seq.request_id
        assert len(seq.output_token_ids) == seq.max_tokens
    assert queued, "no sibling ever waited for a seat"
    assert all(first["urgent"] < first[s.request_id] for s in queued)
    assert first["after"] > max(first[s.request_id] for s in big)  # arrival order otherwise


@pytest.mark.parametrize("lag", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("max_num_seqs", [1, 2, 3])
def test_big_n_under_preemption_pressure(
    max_num_seqs: int, prefix_caching: bool, chunked: bool, lag: bool
) -> None:
    """Groups of n=4..8 on a pool that fits one sequence: preemption, queued forks and
    re-admissions interleave; seats and completion hold."""
    max_model_len = 24
    config = make_config(
        block_size=2,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=32 if chunked else max_model_len,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=prefix_caching,
    )
    specs = [
        GroupSpec(f"g{k}", [(k + i) % 3 for i in range(3 + k)], 10 + k, 4 + 2 * k, 0, 0, None, [])
        for k in range(3)
    ]
    sched = Scheduler(config, num_blocks=cdiv(max_model_len, 2))
    groups = [build_group(g, max_model_len) for g in specs]
    for g in groups:
        sched.add_request(g[0])
    drive(sched, lag=lag)
    assert sched.num_preemptions > 0 or max_num_seqs == 1
    for g, spec in zip(groups, specs, strict=True):
        for seq in g:
            assert seq.status == RequestStatus.FINISHED_LENGTH
            assert len(seq.output_token_ids) == effective_max_tokens(spec, max_model_len)
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


@settings(max_examples=60, deadline=None)
@given(wl=workload(max_n=8))
def test_random_workloads_with_large_n_respect_max_num_seqs(
    wl: tuple[SimConfig, list[GroupSpec]],
) -> None:
    cfg, groups = wl
    res = simulate(cfg, groups)  # checks seats after every schedule and update
    check_final(res, cfg, groups)
    assert res.max_running <= cfg.max_num_seqs


@pytest.mark.parametrize(
    "policy,want", [("fcfs", ["p2", "p0", "p1"]), ("priority", ["p0", "p1", "p2"])]
)
def test_scheduling_policy_orders_admission(policy: str, want: list[str]) -> None:
    """fcfs: arrival order whatever the priority; priority: lower value first, then arrival."""
    sched = seats_sched(max_num_seqs=1, scheduling_policy=policy)
    for arrival, prio in enumerate([2, 0, 1]):
        spec = GroupSpec(f"p{prio}", [0, 1], 2, 1, prio, arrival, None, [None])
        sched.add_request(build_group(spec, 32)[0])
    admitted: list[str] = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        admitted += [s.request.request_id for s in out.scheduled if s.start == 0]
        sched.update_from_output(out, {s.request.request_id: 1 for s in out.scheduled})
    assert admitted == want
