"""``EngineStats``: it survives the trip between processes (pickled, signed, small), and a small
engine run driven through ``EngineCore`` fills every field with the right figure (CPU, tiny
model, no process)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
from pathlib import Path
from typing import Any

import pytest

from pagedllm import EngineConfig, SamplingParams
from pagedllm.engine.core_proc import EngineCore
from pagedllm.engine.framing import decode, encode, new_key
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.messages import (
    AddRequest,
    EngineOutputs,
    EngineReady,
    Heartbeat,
    RequestError,
)
from pagedllm.engine.stats import EngineStats, SchedulerStats

NUM_BLOCKS, BLOCK_SIZE = 48, 16


def _stats(**overrides: int | float) -> EngineStats:
    """Every field a distinct value, so that a swapped field cannot go unnoticed."""
    names = [f.name for f in dataclasses.fields(EngineStats)]
    values: dict[str, Any] = {name: i + 1 for i, name in enumerate(names)}
    values["kv_cache_usage"] = 0.375
    return EngineStats(**{**values, **overrides})


def test_pickle_round_trip() -> None:
    stats = _stats()
    back = pickle.loads(pickle.dumps(stats, protocol=pickle.HIGHEST_PROTOCOL))
    assert type(back) is EngineStats and back == stats
    assert dataclasses.astuple(back) == dataclasses.astuple(stats)
    # Positional: no field names on the wire (they would be most of the bytes).
    assert len(pickle.dumps(stats, protocol=pickle.HIGHEST_PROTOCOL)) < 120
    sched = SchedulerStats(
        **{f.name: getattr(stats, f.name) for f in dataclasses.fields(SchedulerStats)}
    )
    assert type(pickle.loads(pickle.dumps(sched))) is SchedulerStats
    assert pickle.loads(pickle.dumps(sched)) == sched != stats  # another type, never equal


def test_in_signed_messages() -> None:
    key = new_key()
    stats = _stats()
    for msg in (EngineReady(123, stats), EngineOutputs([], stats), Heartbeat(stats), Heartbeat()):
        assert decode(encode(msg, key), key) == msg


def test_frozen() -> None:
    stats = _stats()
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.num_waiting = 0  # type: ignore[misc]
    assert dataclasses.replace(stats, num_waiting=0).num_waiting == 0 != stats.num_waiting


class _Sent:
    """``Channel``'s ``send`` for ``EngineCore``: keeps the messages."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def send(self, msg: Any) -> None:
        self.messages.append(msg)


@pytest.fixture(scope="module")
def core(llama_dir: Path) -> EngineCore:
    config = EngineConfig(model=str(llama_dir), num_gpu_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    return EngineCore(LLMEngine(config), _Sent())  # type: ignore[arg-type]


def _add(core: EngineCore, request_id: str, prompt: list[int], params: SamplingParams) -> None:
    err = core.add(AddRequest(request_id, prompt, params, time.monotonic()))
    assert err is None, err


def _run(core: EngineCore) -> list[EngineOutputs]:
    steps = []
    while core.engine.has_unfinished_requests():
        out = core.step()
        if out is not None:  # None: only grammars compiling, nothing to send
            steps.append(out)
    return steps


def test_fields_from_a_small_run(core: EngineCore) -> None:
    start = core.stats()
    assert type(start) is EngineStats
    assert (start.num_running, start.num_waiting, start.num_unfinished_requests) == (0, 0, 0)
    assert start.kv_cache_usage == 0.0 and start.num_kv_blocks == NUM_BLOCKS
    assert start.requests_received_total == start.num_steps_total == 0

    # Two requests: one of n=2 that runs to max_tokens, one aborted after its first token.
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, n=2)
    _add(core, "a", [5, 6, 7, 8, 9], greedy)
    _add(core, "b", [10, 11, 12], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    queued = core.stats()
    assert queued.requests_received_total == 2 and queued.num_unfinished_requests == 2
    assert queued.num_waiting >= 2 and queued.num_running == 0

    first = core.step()
    assert first.stats == core.stats()  # each step's message carries the stats after it
    assert first.stats.num_running >= 2 and first.stats.num_waiting == 0
    assert 0.0 < first.stats.kv_cache_usage <= 1.0
    assert first.stats.prompt_tokens_total == 8  # both prompts computed, counted once each
    core.abort(["b"])
    steps = [first, *_run(core)]

    end = core.stats()
    assert end == steps[-1].stats
    assert end.num_steps_total == len(steps)
    assert (end.num_running, end.num_waiting, end.num_unfinished_requests) == (0, 0, 0)
    assert end.kv_cache_usage == 0.0 and end.num_kv_blocks == NUM_BLOCKS
    assert end.requests_received_total == 2
    assert end.prompt_tokens_total == 8
    b_tokens = [o for s in steps for o in s.outputs if o.request_id == "b"][-1]
    assert end.generation_tokens_total == 2 * 4 + len(b_tokens.outputs[0].token_ids)
    assert end.requests_finished_length == 2  # per completion: n=2
    assert end.requests_finished_abort == 1 and end.requests_finished_stop == 0
    assert end.num_preemptions == 0
    assert end.prefix_cache_queries >= 8 and 0 <= end.prefix_cache_hits <= end.prefix_cache_queries
    # The engine's own part is ``LLMEngine.stats()``, field for field.
    sched = core.engine.stats()
    assert type(sched) is SchedulerStats
    assert all(getattr(end, f.name) == getattr(sched, f.name) for f in dataclasses.fields(sched))


def test_rejected_request_counts_as_received(core: EngineCore) -> None:
    before = core.stats()
    too_long = SamplingParams(temperature=0.0, max_tokens=None)  # may outgrow the KV pool
    err = core.add(AddRequest("c", [5, 6], too_long, time.monotonic()))
    assert isinstance(err, RequestError)
    after = core.stats()
    assert after == dataclasses.replace(
        before, requests_received_total=before.requests_received_total + 1
    )
    # An idle engine sends changed stats at once, unchanged ones never twice.
    sent: _Sent = core.out  # type: ignore[assignment]
    core.idle_report()
    assert sent.messages[-1] == Heartbeat(after)
    core._last_sent = time.monotonic() - 60  # the heartbeat interval is up
    core.idle_report()
    assert sent.messages[-1] == Heartbeat()


def test_rejected_request_errors_say_value_error(
    core: EngineCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request's own fault (any ValueError, a constraint that does not compile included)
    travels as "ValueError", which the server answers with a 400; other errors keep their
    type (a 500)."""
    bad = SamplingParams(max_tokens=4, structured_outputs={"regex": "a(b"})
    # The engine loop does not wait for a grammar: its error is sent after a later step.
    assert core.add(AddRequest("re", [5, 6], bad, time.monotonic())) is None
    sent = core.out.messages
    before = len(sent)
    _run(core)
    errors = [m for m in sent[before:] if isinstance(m, RequestError)]
    assert [e.request_id for e in errors] == ["re"]
    err = errors[0]
    assert err.error_type == "ValueError"
    assert err.message.startswith("structured outputs (regex)") and "unclosed" in err.message
    assert "re" not in core._live and not core._unqueued
    assert not core.engine.has_unfinished_requests()
    ok = SamplingParams(max_tokens=4)
    for exc, kind in [
        (json.JSONDecodeError("Expecting value", "x", 0), "ValueError"),
        (KeyError("k"), "KeyError"),
    ]:

        def fail(*args: Any, exc: Exception = exc, **kwargs: Any) -> str:
            raise exc

        monkeypatch.setattr(core.engine, "add_request", fail)
        err = core.add(AddRequest("sub", [5, 6], ok, time.monotonic()))
        assert isinstance(err, RequestError) and err.error_type == kind


def test_a_request_that_waited_for_its_grammar_is_counted(core: EngineCore) -> None:
    """Queued only once its grammar compiled, the request's tokens still count, and nothing of
    it stays behind; the same for one aborted while it waited."""
    before = core.stats().generation_tokens_total
    fresh = SamplingParams(max_tokens=4, ignore_eos=True, structured_outputs={"regex": "[ab]{9}"})
    assert core.add(AddRequest("g1", [5, 6], fresh, time.monotonic())) is None
    other = SamplingParams(max_tokens=4, structured_outputs={"regex": "[cd]{9}"})
    assert core.add(AddRequest("g2", [5, 6], other, time.monotonic())) is None
    core.abort(["g2"])
    _run(core)
    assert core.stats().generation_tokens_total - before == 4
    assert not core._live and not core._unqueued
