"""A model-free engine loop around the token-budget `Scheduler`, for the scheduler's tests.

``Harness.step()`` calls ``schedule()``, fabricates one sampled token (or a list of them,
from a ``TokenFn``) for every sequence a span samples (``sample_seq_ids``: the sequence,
plus its ``pending_forks`` on its first token); ``Harness.update()`` feeds them back with
``update_from_output``. ``advance`` is one iteration of the loop, either synchronous (the
step's tokens are applied right away) or async (``lag``: step N+1 is scheduled before step
N's tokens are applied), checking the invariants of ``scheduler_invariants`` after every
schedule and update; ``drive`` runs it until everything finished.

Every step also goes, pickled, to a worker replica (``SequenceStates``, what the model runner
keeps), and the worker's inputs for the step are built from it (``prepare_step_inputs``). The
harness checks that:

* the step survives pickling; it reports as finished, each once, sequences the worker knows
  and the scheduler no longer does (or whose id a new sequence of this step takes over); it
  sends each sequence once in its lifetime, with its prompt, params, seed and index, in a
  step that schedules it or samples it as a fresh fork;
* the replica holds exactly the live sequences it was told about (finished ones are dropped
  by the step that reports them), with the host's tokens and the scheduler's block tables;
  it misses at most the one token still on the device (none when synchronous), never for a
  sequence whose penalties need host tokens, and knows every sequence it is asked to sample;
* the worker's flat inputs (token ids with the previous step's samples patched in,
  positions, KV slots, sample rows) are exactly what the spans must compute;
* ``update_from_output`` reports exactly the sampled sequences, keeps a prefix of each one's
  tokens (dropping some only when it finished), and leaves at most the step in flight
  pending.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import cdiv
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import ScheduledSequence, SchedulerOutput
from pagedllm.core.sequence import Sequence
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.sequence_states import SequenceStates
from pagedllm.worker.step_inputs import StepInputs, prepare_step_inputs
from tests.core.scheduler_invariants import check_seats, check_state

STOP = 99  # the stop token; fabricated ordinary tokens are in 0..4, prompts in 0..2
LAGS = pytest.mark.parametrize("lag", [False, True], ids=["sync", "async"])
CHUNKED = pytest.mark.parametrize("chunked", [True, False])
PREFIX_CACHING = pytest.mark.parametrize("prefix_caching", [True, False])

F = TypeVar("F", bound=Callable[..., object])


def each_engine_mode(test: F) -> F:
    """Parametrize ``test`` over ``prefix_caching``, ``chunked`` and ``lag`` (sync/async)."""
    return LAGS(CHUNKED(PREFIX_CACHING(test)))


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
    return EngineConfig(model=model_dir(), device="cpu", **kw)


def scheduler_for(config: EngineConfig, num_blocks: int) -> Scheduler:
    """The scheduler an engine with ``config`` and a pool of ``num_blocks`` blocks builds."""
    max_model_len = config.model_config.max_model_len
    assert max_model_len is not None
    return Scheduler(config.scheduler_config, config.cache_config, max_model_len, num_blocks)


def make_params(**kw: object) -> SamplingParams:
    params = SamplingParams(ignore_eos=True, stop_token_ids=[STOP], **kw)  # type: ignore[arg-type]
    params.update_from_generation_config(set())
    return params


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
        flat = inp.input_ids.tolist()
        self.num_fixups += len(inp.fix_rows)
        for row, src in zip(inp.fix_rows, inp.fix_src, strict=True):
            flat[row] = self.last_sampled[src]
        assert flat == [t for part in truth for t in part], "the worker computes wrong tokens"
        assert inp.seq_lens.tolist() == [s.end for s in out.scheduled]
        starts = inp.query_start.tolist()
        assert starts == [0, *itertools.accumulate(s.num_new_tokens for s in out.scheduled)]
        assert inp.block_tables.shape[1] == cdiv(max((s.end for s in out.scheduled), default=0), bs)
        for i, s in enumerate(out.scheduled):
            table = sched.kv.block_ids(s.seq_id)
            pos = inp.positions[starts[i] : starts[i + 1]].tolist()
            slots = inp.slot_mapping[starts[i] : starts[i + 1]].tolist()
            assert pos == list(range(s.num_computed_tokens, s.end))
            assert slots == [table[p // bs] * bs + p % bs for p in pos]
            used = cdiv(s.end, bs)
            assert inp.block_tables[i, :used].tolist() == table[:used], f"{s.seq_id}: table row"
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


# ---- the engine loop -----------------------------------------------------------------------

Inflight = tuple[SchedulerOutput, dict[str, list[int]]] | None  # a step and its sampled tokens


def advance(
    h: Harness,
    inflight: Inflight,
    token_fn: TokenFn = one,
    on_schedule: Callable[[SchedulerOutput], None] | None = None,
) -> tuple[SchedulerOutput, Inflight]:
    """One iteration of the engine loop: schedule a step, then apply the tokens of the step
    in flight (async: ``h.lag``) or of this one (synchronous). Checks the seat and state
    invariants after the schedule (``on_schedule(out)`` runs between the two) and after the
    update, and that a step with sequences pending schedules something. Returns the step
    and what is now in flight.
    """
    sched, lag = h.sched, h.lag
    in_flight = inflight[0] if inflight else None
    out, sampled = h.step(token_fn)
    check_seats(sched)
    if on_schedule is not None:
        on_schedule(out)
    check_state(sched, [in_flight, out], lag)
    if inflight is not None:
        h.update(*inflight)
        check_seats(sched)
        check_state(sched, [out], lag)
    elif sched.has_unfinished_sequences():
        assert out.scheduled, "no progress with sequences pending (deadlock)"
    if lag:
        return out, ((out, sampled) if out.scheduled else None)
    h.update(out, sampled)
    check_seats(sched)  # forks too: siblings without a seat wait
    check_state(sched)
    return out, None


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
    inflight: Inflight = None
    first: dict[str, tuple[int, int]] = {}
    for step in range(max_steps):
        if on_step is not None:
            on_step(step)
        if not h.sched.has_unfinished_sequences() and inflight is None:
            h.finish()
            return first
        out, inflight = advance(h, inflight, token_fn)
        for i, s in enumerate(out.scheduled):
            first.setdefault(s.seq_id, (step, i))
    raise AssertionError(f"no completion after {max_steps} steps")


def seats_sched(max_num_seqs: int, num_blocks: int = 64, **kw: object) -> Scheduler:
    config = make_config(
        block_size=4, max_model_len=32, max_num_seqs=max_num_seqs, max_num_batched_tokens=64, **kw
    )
    return scheduler_for(config, num_blocks)


def scheduled_steps(h: Harness, seq_id: str) -> list[int]:
    return [i for i, out in enumerate(h.history) if any(s.seq_id == seq_id for s in out.scheduled)]


def spans_of(h: Harness, seq_id: str) -> list[tuple[int, ScheduledSequence]]:
    """Every span of ``seq_id`` in the steps so far, with its step's index."""
    return [(i, s) for i, out in enumerate(h.history) for s in out.scheduled if s.seq_id == seq_id]
