"""Property-based tests of the token-budget `Scheduler`, driven without a model.

A simulated engine loop calls ``schedule()``, fabricates one sampled token for every sequence
a span samples (``sample_seq_ids``: the sequence, plus its ``pending_forks`` on its first
token), and feeds it back with ``update_from_output``, either right away (synchronous) or one
step late (async scheduling: step N+1 is scheduled before step N's tokens are applied).
Random workloads (arrival times, prompt lengths, ``max_tokens``, ``n`` in 1..3, priorities,
aborts, stop tokens) run against random small KV pools, block sizes and token budgets, with
and without chunked prefill and prefix caching. Every step is checked against the
scheduler's invariants, and every sequence's final output against what it must be.

Every step also goes, pickled, to a worker replica (``SequenceStates``, what the model runner
keeps), and the worker's inputs for the step are built from it (``prepare_step_inputs``): the
replica must hold exactly the host's tokens and the scheduler's block tables, miss at most
the one token still on the device (none when synchronous), know every sequence it is asked to
sample, and drop finished sequences once a step reports them.
"""

from __future__ import annotations

import atexit
import functools
import json
import pickle
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pagedllm.config import EngineConfig
from pagedllm.core.block_pool import hash_block
from pagedllm.core.kv_cache_manager import cdiv
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.core.sequence import Sequence, SequenceStatus
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.sequence_states import SequenceStates
from pagedllm.worker.step_inputs import StepInputs, prepare_step_inputs

STOP = 99  # the stop token; fabricated ordinary tokens are in 0..4, prompts in 0..2
LAGS = pytest.mark.parametrize("lag", [False, True], ids=["sync", "async"])


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


def make_params(**kw: object) -> SamplingParams:
    params = SamplingParams(ignore_eos=True, stop_token_ids=[STOP], **kw)  # type: ignore[arg-type]
    params.update_from_generation_config(set())
    return params


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


# ---- invariants ----------------------------------------------------------------------------


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


# ---- the worker replica --------------------------------------------------------------------

TokenFn = Callable[[str, int], int | list[int]]  # (seq id, output index) -> sampled token(s)


def one(sid: str, k: int) -> int:
    return 1


def live_sequences(sched: Scheduler) -> dict[str, Sequence]:
    """Every unfinished sequence, including unforked siblings (``pending_forks``)."""
    return {s.seq_id: s for r in sched.sequences.values() for s in (r, *r.pending_forks)}


@dataclass
class Harness:
    """A scheduler plus the worker's replica of its sequences.

    ``step()`` schedules, sends the step (pickled, as to a worker in another process) to a
    ``SequenceStates`` replica, checks the replica against the scheduler, builds the worker's
    inputs with ``prepare_step_inputs`` and fabricates the sampled tokens; ``update()`` feeds
    them back. With ``lag`` the caller applies step N's tokens after scheduling step N+1.
    """

    sched: Scheduler
    lag: bool = False
    replica: SequenceStates = field(default_factory=lambda: SequenceStates(torch.device("cpu")))
    history: list[SchedulerOutput] = field(default_factory=list)
    sent: set[str] = field(default_factory=set)  # every id ever in new_sequences
    prev_sampled: dict[str, list[int]] = field(default_factory=dict)  # the previous step's
    last_rows: dict[str, int] = field(default_factory=dict)  # the runner's, for fixups
    last_sampled: list[int] = field(default_factory=list)
    num_fixups: int = 0  # inputs taken from the previous step's samples (async only)

    def step(self, token_fn: TokenFn = one) -> tuple[SchedulerOutput, dict[str, list[int]]]:
        out = self.sched.schedule()
        inp = self._send(out)
        known = live_sequences(self.sched)
        sampled: dict[str, list[int]] = {}
        for s in out.scheduled:
            num_prompt = known[s.seq_id].num_prompt_tokens
            for sid in s.sample_seq_ids:
                tokens = token_fn(sid, s.end - num_prompt)
                sampled[sid] = tokens if isinstance(tokens, list) else [tokens]
        # What the runner keeps for the next step's fixups: one sampled id per sample row.
        if inp.sample_ids:
            self.last_sampled = [sampled[sid][0] for sid in inp.sample_ids]
            self.last_rows = {sid: i for i, sid in enumerate(inp.sample_ids)}
        self.prev_sampled = sampled
        return out, sampled

    def update(
        self, out: SchedulerOutput, sampled: dict[str, list[int]]
    ) -> list[tuple[Sequence, list[int]]]:
        sched = self.sched
        want = {
            sid
            for s in out.scheduled
            if s.samples and s.seq_id in sched.sequences
            for sid in s.sample_seq_ids
        }
        changed = sched.update_from_output(out, sampled)
        got = [seq.seq_id for seq, _ in changed]
        assert len(got) == len(set(got)) and set(got) == want, (got, want)
        for seq, kept in changed:
            tokens = sampled[seq.seq_id]
            assert 1 <= len(kept) <= len(tokens) and kept == tokens[: len(kept)]
            assert seq.output_token_ids[-len(kept) :] == kept
            if len(kept) < len(tokens):
                assert seq.is_finished, f"{seq.seq_id} dropped tokens but goes on"
        for seq in live_sequences(sched).values():  # at most the step still in flight
            assert 0 <= seq.num_pending <= (1 if self.lag else 0), (seq.seq_id, seq.num_pending)
        return changed

    def finish(self) -> SchedulerOutput:
        """Once everything finished: one more (empty) step tells the worker to drop the rest."""
        assert not self.sched.has_unfinished_sequences()
        out = self.sched.schedule()
        assert out.is_empty and not out.new_sequences and not out.preempted_seq_ids
        self._send(out)
        assert len(self.replica) == 0, f"the worker still holds {sorted(self.replica.seqs)}"
        return out

    def _send(self, out: SchedulerOutput) -> StepInputs:
        """Pickle ``out`` to the replica and check the replica and the worker's inputs."""
        self.history.append(out)
        sched, replica = self.sched, self.replica
        wire = pickle.loads(pickle.dumps(out))
        assert wire == out, "the step does not survive pickling"
        for new, sent in zip(wire.new_sequences, out.new_sequences, strict=True):
            assert new.params.all_stop_token_ids == sent.params.all_stop_token_ids
        known = live_sequences(sched)
        # Finished: known to the worker, no longer to the scheduler, reported once.
        assert len(set(out.finished_seq_ids)) == len(out.finished_seq_ids)
        for sid in out.finished_seq_ids:
            assert sid in replica.seqs, f"{sid} finished but the worker never saw it"
            self.sent.discard(sid)  # its id may be used again by a new sequence
            reused = sid in {n.seq_id for n in out.new_sequences}  # the worker drops it first
            assert reused or sid not in known, f"{sid} reported finished while live"
        # New: sent once in the lifetime of a sequence, with what the worker needs.
        scheduled_ids = {s.seq_id for s in out.scheduled}
        forked_ids = {sid for s in out.scheduled for sid in s.sample_seq_ids[1:]}
        for new in out.new_sequences:
            assert new.seq_id not in self.sent, f"{new.seq_id} sent to the worker twice"
            self.sent.add(new.seq_id)
            assert new.seq_id in scheduled_ids | forked_ids, f"{new.seq_id} sent idle"
            seq = known[new.seq_id]
            assert new.prompt_token_ids == seq.prompt_token_ids
            assert new.params == seq.params and new.seed == seq.seed and new.index == seq.index
        replica.apply(wire)
        # The worker holds exactly the live sequences it was told about: finished ones are
        # dropped by the step that reports them.
        on_worker = {sid for sid, s in known.items() if s.on_worker}
        assert set(replica.seqs) == on_worker, (sorted(replica.seqs), sorted(on_worker))
        bs = sched.block_size
        truth: list[list[int]] = []  # per span: the tokens it must compute
        for s in out.scheduled:
            seq, rep = known[s.seq_id], replica[s.seq_id]
            assert rep.token_ids == seq.all_token_ids, f"{s.seq_id}: worker tokens differ"
            assert rep.num_prompt_tokens == seq.num_prompt_tokens and rep.index == seq.index
            missing = s.end - len(rep.token_ids)  # positions only the device knows
            assert missing <= (1 if self.lag else 0), f"{s.seq_id}: {missing} tokens missing"
            if s.samples:
                assert missing in (0, 1)
            tokens = seq.all_token_ids
            if missing == 1:  # sampled by the step before, still on the device
                assert s.seq_id in self.prev_sampled, f"{s.seq_id}: in-flight token from where?"
                assert not seq.params.needs_host_tokens, f"{s.seq_id}: penalties run ahead"
                tokens = tokens + self.prev_sampled[s.seq_id][:1]
            truth.append(tokens[s.num_computed_tokens : s.end])
            assert rep.block_ids == sched.kv.block_ids(s.seq_id), f"{s.seq_id}: block table"
            assert len(rep.block_ids) == cdiv(s.end, bs)
            if s.samples:
                first = s.end == seq.num_prompt_tokens  # siblings sample their first token too
                forks = [c.seq_id for c in seq.pending_forks] if first else []
                assert s.sample_seq_ids == [s.seq_id, *forks]
            for sid in s.sample_seq_ids:
                assert sid in replica.seqs, f"{sid} sampled but unknown to the worker"
        # The worker's flat inputs: token ids (fixups patched in), positions and KV slots.
        inp = prepare_step_inputs(wire, replica, bs, self.last_rows)
        flat = [t for part in inp.ids_parts for t in part]
        self.num_fixups += len(inp.fix_rows)
        for row, src in zip(inp.fix_rows, inp.fix_src, strict=True):
            flat[row] = self.last_sampled[src]
        assert flat == [t for part in truth for t in part], "the worker computes wrong tokens"
        assert inp.seq_lens == [s.end for s in out.scheduled]
        for s, pos, slots in zip(out.scheduled, inp.pos_parts, inp.slot_parts, strict=True):
            table = sched.kv.block_ids(s.seq_id)
            assert pos.tolist() == list(range(s.num_computed_tokens, s.end))
            assert slots.tolist() == [table[p // bs] * bs + p % bs for p in pos.tolist()]
        rows = [(s, sid) for s in out.scheduled for sid in s.sample_seq_ids]
        assert inp.sample_ids == [sid for _, sid in rows]
        for (s, sid), row in zip(rows, inp.sample_rows, strict=True):
            target = known[sid]
            assert row.num_output_tokens == s.end - target.num_prompt_tokens
            assert row.prompt_token_ids == target.prompt_token_ids
            assert row.output_token_ids == target.output_token_ids
            if row.params.needs_host_tokens:  # penalties see every previous token
                assert len(row.output_token_ids) == row.num_output_tokens
        return inp


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


def simulate(cfg: SimConfig, groups: list[GroupSpec], lag: bool = False) -> SimResult:
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
    inflight: tuple[SchedulerOutput, dict[str, list[int]]] | None = None
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
        in_flight = inflight[0] if inflight else None
        check_state(sched, [in_flight], lag)
        was_waiting = {r.seq_id for r in sched.waiting}
        out, sampled = h.step(token)
        check_seats(sched)
        check_step(sched, out, was_waiting, cfg.chunked, lag)
        check_state(sched, [in_flight, out], lag)
        assert len(out.scheduled) <= cfg.max_num_seqs
        if inflight is not None:
            h.update(*inflight)
            inflight = None
            check_seats(sched)
            check_state(sched, [out], lag)
        elif sched.has_unfinished_sequences():
            assert out.scheduled, "no progress with sequences pending (deadlock)"
        if lag:
            inflight = (out, sampled) if out.scheduled else None
        else:
            h.update(out, sampled)
            check_seats(sched)  # forks too: siblings without a seat wait
            check_state(sched)
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


@LAGS
@settings(max_examples=250, deadline=None)
@given(wl=workload())
def test_random_workloads_keep_invariants_and_finish(
    lag: bool, wl: tuple[SimConfig, list[GroupSpec]]
) -> None:
    cfg, groups = wl
    res = simulate(cfg, groups, lag)
    check_final(res, cfg, groups)
    kv = res.sched.kv
    event(f"preempted: {res.sched.num_preemptions > 0}")
    event(f"prefix hits: {kv.prefix_hits > 0}")
    event(f"aborted: {bool(res.aborted)}")
    event(f"forked: {any(g.n > 1 for g in groups)}")
    statuses = {s.status for seqs in res.seqs.values() for s in seqs}
    event(f"stopped: {SequenceStatus.FINISHED_STOPPED in statuses}")
    event(f"n > max_num_seqs: {any(g.n > cfg.max_num_seqs for g in groups)}")
    event(f"penalties: {any(g.penalty for g in groups)}")
    event(f"ran ahead: {res.harness.num_fixups > 0}")
    if not lag:
        assert res.harness.num_fixups == 0
    assert res.max_running <= cfg.max_num_seqs


@LAGS
@settings(max_examples=60, deadline=None)
@given(wl=workload(max_n=1))
def test_single_sequence_requests_respect_max_num_seqs(
    lag: bool, wl: tuple[SimConfig, list[GroupSpec]]
) -> None:
    cfg, groups = wl
    res = simulate(cfg, groups, lag)
    check_final(res, cfg, groups)
    assert res.max_running <= cfg.max_num_seqs


@LAGS
@settings(max_examples=80, deadline=None)
@given(wl=workload(chunked=False))
def test_random_workloads_without_chunked_prefill(
    lag: bool, wl: tuple[SimConfig, list[GroupSpec]]
) -> None:
    cfg, groups = wl
    check_final(simulate(cfg, groups, lag), cfg, groups)


# ---- preemption ----------------------------------------------------------------------------


@LAGS
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_tiny_pool_preempts_and_still_finishes(
    chunked: bool, prefix_caching: bool, block_size: int, lag: bool
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
    res = simulate(cfg, groups, lag)
    check_final(res, cfg, groups)
    assert res.sched.num_preemptions > 0
    assert any(out.preempted_seq_ids for out in res.harness.history)
    preempted = [s for g in groups for s in res.seqs[g.gid] if s.num_preemptions > 0]
    assert preempted
    for seq in preempted:  # recomputed from scratch (or the cache) and still complete
        g = groups[int(seq.request_id[1:])]
        assert seq.status == SequenceStatus.FINISHED_LENGTH
        assert len(seq.output_token_ids) == effective_max_tokens(g, max_model_len)


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
    sched = Scheduler(
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


# ---- regressions: bugs these tests found, since fixed ------------------------------------


@LAGS
def test_forks_of_running_leaders_respect_max_num_seqs(lag: bool) -> None:
    """Regression (fixed in 497031c): pending siblings of running leaders count as running."""
    cfg = SimConfig(4, 32, True, 64, 3, False, 32)
    groups = [
        GroupSpec("a", [0, 1, 2, 0, 1], 4, 3, 0, 0, None, [None] * 3),  # 3 seqs: fills the batch
        GroupSpec("b", [2, 2, 1], 4, 1, 0, 0, None, [None]),  # admitted in the same step
    ]
    res = simulate(cfg, groups, lag)
    check_final(res, cfg, groups)
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
    res = simulate(cfg, groups, lag)
    check_final(res, cfg, groups)
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
        res = simulate(cfg, groups)
    check_final(res, cfg, groups)
    assert chunks
    split = [c for c in chunks if c[1] != c[2]]
    assert not split, f"(seq, scheduled, remaining) split chunks: {split}"


# ---- seats: n > max_num_seqs, fork queueing, scheduling policy ---------------------------


def drive(
    h: Harness,
    on_step: Callable[[int], None] | None = None,
    max_steps: int = 2000,
    token_fn: TokenFn = one,
) -> dict[str, tuple[int, int]]:
    """Run ``h.sched`` to completion, fabricating token 1 (or ``token_fn``'s) for every
    sampled sequence; with ``h.lag`` each step is scheduled before the previous one's tokens
    are applied (async scheduling). ``on_step(step)`` runs before each schedule (arrivals).
    Checks the seat and state invariants after every schedule and update (and the worker
    replica, through the harness). Returns when each sequence was first scheduled: (step,
    position in that step; admissions come after the running sequences, in order).
    """
    sched, lag = h.sched, h.lag
    inflight: tuple[SchedulerOutput, dict[str, list[int]]] | None = None
    first: dict[str, tuple[int, int]] = {}
    for step in range(max_steps):
        if on_step is not None:
            on_step(step)
        if not sched.has_unfinished_sequences() and inflight is None:
            h.finish()
            return first
        in_flight = inflight[0] if inflight else None
        out, sampled = h.step(token_fn)
        check_seats(sched)
        check_state(sched, [in_flight, out], lag)
        for i, s in enumerate(out.scheduled):
            first.setdefault(s.seq_id, (step, i))
        if inflight is not None:
            h.update(*inflight)
            check_seats(sched)
            check_state(sched, [out], lag)
            inflight = None
        elif sched.has_unfinished_sequences():
            assert out.scheduled, "no progress with sequences pending (deadlock)"
        if lag:
            inflight = (out, sampled) if out.scheduled else None
        else:
            h.update(out, sampled)
            check_seats(sched)
            check_state(sched)
    raise AssertionError(f"no completion after {max_steps} steps")


def seats_sched(max_num_seqs: int, num_blocks: int = 64, **kw: object) -> Scheduler:
    config = make_config(
        block_size=4, max_model_len=32, max_num_seqs=max_num_seqs, max_num_batched_tokens=64, **kw
    )
    return Scheduler(config, num_blocks)


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


@LAGS
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
    h = Harness(Scheduler(config, num_blocks=cdiv(max_model_len, 2)), lag)
    sched = h.sched
    groups = [build_group(g, max_model_len) for g in specs]
    for g in groups:
        sched.add_sequence(g[0])
    drive(h)
    assert sched.num_preemptions > 0 or max_num_seqs == 1
    for g, spec in zip(groups, specs, strict=True):
        for seq in g:
            assert seq.status == SequenceStatus.FINISHED_LENGTH
            assert len(seq.output_token_ids) == effective_max_tokens(spec, max_model_len)
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


@LAGS
@settings(max_examples=60, deadline=None)
@given(wl=workload(max_n=8))
def test_random_workloads_with_large_n_respect_max_num_seqs(
    lag: bool, wl: tuple[SimConfig, list[GroupSpec]]
) -> None:
    cfg, groups = wl
    res = simulate(cfg, groups, lag)  # checks seats after every schedule and update
    check_final(res, cfg, groups)
    assert res.max_running <= cfg.max_num_seqs


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


# ---- the step contract: penalties, multi-token outputs, n > 1 forks ------------------------


def scheduled_steps(h: Harness, seq_id: str) -> list[int]:
    return [i for i, out in enumerate(h.history) if any(s.seq_id == seq_id for s in out.scheduled)]


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
@pytest.mark.parametrize("chunked", [True, False])
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
    h = Harness(Scheduler(config, 64), lag)
    other = build_group(GroupSpec("o", [1, 2], 4, 1, 0, 0, None, [None]), 32)
    group = build_group(GroupSpec("a", [0, 1, 2] * 3 + [0], 3, 4, 0, 1, None, [None] * 4), 32)
    h.sched.add_sequence(other[0])
    h.sched.add_sequence(group[0])
    drive(h)
    sent_at: defaultdict[str, list[int]] = defaultdict(list)
    for i, out in enumerate(h.history):
        for new in out.new_sequences:
            sent_at[new.seq_id].append(i)
    leader_spans = [
        (i, s) for i, out in enumerate(h.history) for s in out.scheduled if s.seq_id == "a"
    ]
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
        spans = [s for out in h.history for s in out.scheduled if s.seq_id == child.seq_id]
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
