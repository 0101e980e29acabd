"""AsyncLLM: the engine in its own process behind an asyncio client (CPU, tiny model).

Besides generation: the engine survives SIGTERM and is stopped by ``shutdown()``, deaths are
told apart from shutdowns, a stopped engine shows as unresponsive (and, with a stall timeout,
is killed), idle engines send heartbeats, requests time out, request ids can be reused at once,
and no forged frame is unpickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pickle
import signal
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import zmq

from pagedllm import LLM, EngineConfig, RequestOutputKind, SamplingParams
from pagedllm.engine.async_llm import (
    AsyncLLM,
    EngineDeadError,
    EngineUnresponsiveError,
    QueueFullError,
    RequestTimeoutError,
)
from pagedllm.engine.framing import encode
from pagedllm.engine.messages import AbortRequests, Heartbeat
from pagedllm.engine.stats import EngineStats
from pagedllm.outputs import RequestOutput
from tests.fixtures.tiny_models import random_prompts

pytestmark = pytest.mark.asyncio(loop_scope="module")

# 48 blocks of 16 tokens: a request that may grow to max_model_len (1024) can never fit, which
# only the engine process can tell (the API process accepts it).
ENGINE_KW = {"num_gpu_blocks": 48, "block_size": 16}
LONG = SamplingParams(temperature=0.0, max_tokens=600, ignore_eos=True)


@pytest.fixture(scope="module")
def config(llama_dir: Path) -> EngineConfig:
    return EngineConfig(model=str(llama_dir), **ENGINE_KW)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def orphan_parent(llama_dir: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Python process that starts an AsyncLLM and prints its engine's pid (for the test that
    kills it). Started before ``engines`` so that both start-ups overlap."""
    script = textwrap.dedent(
        f"""
        import time
        from pagedllm import EngineConfig
        from pagedllm.engine.async_llm import AsyncLLM
        llm = AsyncLLM.from_config(EngineConfig(model={str(llama_dir)!r}, **{ENGINE_KW!r}))
        print(llm._handle.proc.pid, llm._handle.output_addr, flush=True)
        time.sleep(120)
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[2]
    )
    yield proc
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(
    config: EngineConfig, orphan_parent: asyncio.subprocess.Process
) -> AsyncIterator[list[AsyncLLM]]:
    """Five engines, started in parallel (start-up is mostly imports): one shared by most
    tests, one to kill, one to shut down, one to crash, one to stop (SIGSTOP) and then stall."""
    started = await asyncio.gather(
        *(asyncio.to_thread(AsyncLLM.from_config, config) for _ in range(5))
    )
    yield list(started)
    for engine in started:
        engine.shutdown()


@pytest.fixture(scope="module")
def llm(engines: list[AsyncLLM]) -> AsyncLLM:
    return engines[0]


async def collect(gen: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [out async for out in gen]


async def wait_idle(llm: AsyncLLM, timeout: float = 5.0) -> EngineStats:
    """Stats once nothing runs and no KV block is held."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = await llm.get_stats()
        if stats.num_running == 0 and stats.kv_cache_usage == 0:
            return stats
        assert asyncio.get_running_loop().time() < deadline, stats
        await asyncio.sleep(0.02)


async def _until(predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``predicate()`` holds (fail after ``timeout``)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not predicate():
        assert loop.time() - t0 < timeout, "timed out"
        await asyncio.sleep(0.02)
    return loop.time() - t0


async def test_matches_sync_llm(llm: AsyncLLM, llama_dir: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompts: list[str | list[int]] = list(random_prompts(len(tiny_tokenizer), 12, 3, 20, seed=5))
    prompts.append("The quick brown fox")
    params = SamplingParams(temperature=0.0, max_tokens=24)
    ref = LLM(str(llama_dir), **ENGINE_KW).generate(prompts, params, use_tqdm=False)
    results = await asyncio.gather(
        *(collect(llm.generate(p, params, f"match-{i}")) for i, p in enumerate(prompts))
    )
    for prompt, outs, want in zip(prompts, results, ref, strict=True):
        final = outs[-1]
        assert final.finished and not any(o.finished for o in outs[:-1])
        assert final.outputs[0].token_ids == want.outputs[0].token_ids
        assert final.outputs[0].text == want.outputs[0].text
        assert final.outputs[0].finish_reason == want.outputs[0].finish_reason
        assert final.prompt_token_ids == want.prompt_token_ids
        assert final.prompt == (prompt if isinstance(prompt, str) else None)
    await wait_idle(llm)


async def test_delta_streaming_with_n(llm: AsyncLLM) -> None:
    kw = dict(n=3, temperature=0.9, seed=11, max_tokens=20, ignore_eos=True)
    cum = (await collect(llm.generate([7, 8, 9, 10], SamplingParams(**kw), "cum")))[-1]
    delta_params = SamplingParams(output_kind=RequestOutputKind.DELTA, **kw)
    deltas = await collect(llm.generate([7, 8, 9, 10], delta_params, "delta"))
    assert len(deltas) > 3 and deltas[-1].finished
    assert sorted(c.index for c in cum.outputs) == [0, 1, 2]
    for c in cum.outputs:
        parts = [p for d in deltas for p in d.outputs if p.index == c.index]
        assert "".join(p.text for p in parts) == c.text
        assert sum((p.token_ids for p in parts), []) == c.token_ids
        assert len(c.token_ids) == 20


async def test_cancelled_consumer_aborts(llm: AsyncLLM) -> None:
    before = await wait_idle(llm)
    started = asyncio.Event()

    async def consume() -> None:
        async for out in llm.generate([5, 6, 7], LONG, "cancel-me"):
            if len(out.outputs[0].token_ids) >= 3:
                started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 5)
    assert (await llm.get_stats()).num_running == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after = await wait_idle(llm)
    assert after.requests_finished_abort == before.requests_finished_abort + 1

    # Closing the generator early (e.g. `break`) aborts too.
    gen = llm.generate([5, 6, 8], LONG, "close-me")
    async for out in gen:
        if len(out.outputs[0].token_ids) >= 3:
            break
    await gen.aclose()
    # Aborted, unless the engine happened to finish it while the reader slept.
    await _ended(llm, after, aborted=None, ended=1)


async def test_abort_ends_stream(llm: AsyncLLM) -> None:
    gen = llm.generate([5, 6, 9], LONG, "abort-me")
    first = await gen.__anext__()
    await llm.abort("abort-me")
    rest = [out async for out in gen]
    final = rest[-1] if rest else first
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert len(final.outputs[0].token_ids) < 600
    await wait_idle(llm)


async def test_request_id_reuse(llm: AsyncLLM) -> None:
    """An id can be reused as soon as its ``generate()`` has ended, before the engine has even
    seen the old request's abort: the old request's late outputs, its abort, and a late
    ``abort()`` of the id cannot reach the new request."""
    short = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for _ in range(3):
        gen = llm.generate([5, 6, 7], LONG, "reuse")
        await gen.__anext__()
        await gen.aclose()  # its abort is on its way
        await llm.abort("reuse")  # not in flight any more: nothing to do
        outs = await collect(llm.generate([5, 6, 7], short, "reuse"))
        final = outs[-1]
        assert final.request_id == "reuse" and final.outputs[0].finish_reason == "length"
        assert len(final.outputs[0].token_ids) == 3
    await wait_idle(llm)


async def test_invalid_requests(llm: AsyncLLM, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ok = SamplingParams(temperature=0.0, max_tokens=4)
    bad_prompts: list[list[int]] = [[], [len(tiny_tokenizer) + 5], [5] * 1024]
    for i, prompt in enumerate(bad_prompts):
        with pytest.raises(ValueError):
            await collect(llm.generate(prompt, ok, f"bad-{i}"))
    with pytest.raises(ValueError, match="logprobs"):
        await collect(llm.generate([5], SamplingParams(logprobs=10**7), "bad-lp"))
    with pytest.raises(ValueError, match="empty"):
        llm.input_processor.check_prompt([], ok)
    with pytest.raises(ValueError, match="priority scheduling is not enabled"):
        await collect(llm.generate([5], ok, "bad-priority", priority=2))
    # Accepted by the API process, rejected by the engine (can never fit in 48 KV blocks).
    too_long = SamplingParams(temperature=0.0, max_tokens=None)
    with pytest.raises(ValueError, match="KV"):
        await collect(llm.generate([5, 6], too_long, "never-fits"))
    # Ids in flight are refused; the engine keeps serving.
    gen = llm.generate([5, 6, 7], ok, "dup")
    first = await gen.__anext__()
    with pytest.raises(ValueError, match="already in use"):
        await collect(llm.generate([5, 6, 7], ok, "dup"))
    rest = [first] + [o async for o in gen]
    assert rest[-1].finished and len(rest[-1].outputs[0].token_ids) == 4
    # The id can be reused once finished.
    again = await collect(llm.generate([5, 6, 7], ok, "dup"))
    assert again[-1].outputs[0].token_ids == rest[-1].outputs[0].token_ids


async def test_stats_counters(llm: AsyncLLM) -> None:
    before = await wait_idle(llm)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, n=2)
    await collect(llm.generate([9, 10, 11, 12], params, "stats"))
    after = await wait_idle(llm)
    assert after.prompt_tokens_total - before.prompt_tokens_total == 4
    assert after.generation_tokens_total - before.generation_tokens_total == 10
    assert after.requests_finished_length - before.requests_finished_length == 2
    assert after.requests_finished_stop == before.requests_finished_stop
    assert after.requests_received_total - before.requests_received_total == 1
    assert after.num_steps_total > before.num_steps_total
    assert after.prefix_cache_queries - before.prefix_cache_queries >= 4
    assert after.num_unfinished_requests == 0 and after.num_kv_blocks == 48
    assert after.num_waiting == 0 and after.num_preemptions == 0


async def test_queue_full(llm: AsyncLLM) -> None:
    llm.max_waiting_requests = 0
    try:
        with pytest.raises(QueueFullError):
            await collect(llm.generate([5], SamplingParams(max_tokens=2), "full"))
    finally:
        llm.max_waiting_requests = None
    assert await collect(llm.generate([5], SamplingParams(max_tokens=2), "not-full"))


async def test_queue_limit_after_rejection(llm: AsyncLLM) -> None:
    """A request the engine rejects while idle leaves no step behind; the idle engine's next
    heartbeat carries the stats that show it was seen, so it does not count as waiting."""
    await wait_idle(llm)
    llm.max_waiting_requests = 1
    try:
        never_fits = SamplingParams(temperature=0.0, max_tokens=None)
        with pytest.raises(ValueError, match="KV"):
            await collect(llm.generate([5, 6], never_fits, "rejected"))
        await _until(lambda: llm._num_waiting() == 0, 2)
        assert await collect(llm.generate([5], SamplingParams(max_tokens=2), "after-rejected"))
    finally:
        llm.max_waiting_requests = None


async def test_engine_killed(engines: list[AsyncLLM]) -> None:
    engine = engines[1]
    deaths: list[str] = []
    engine.on_engine_death = deaths.append
    try:
        await engine.check_health()
        gens = [engine.generate([5, 6, i], LONG, f"kill-{i}") for i in range(10, 13)]
        for g in gens:
            await g.__anext__()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        os.kill(engine._handle.proc.pid, signal.SIGKILL)
        for g in gens:
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(collect(g), 3)
        assert loop.time() - t0 < 2.0
        assert not engine.is_running and engine.died_unexpectedly
        assert len(deaths) == 1 and "exit code -9" in deaths[0]
        with pytest.raises(EngineDeadError):
            await engine.check_health()
        with pytest.raises(EngineDeadError):
            await collect(engine.generate([5], LONG, "after-death"))
    finally:
        engine.shutdown()
        engine.shutdown()
    assert not engine._handle.proc.is_alive()
    assert engine.died_unexpectedly and len(deaths) == 1  # the later shutdown changes neither


async def test_clean_shutdown(engines: list[AsyncLLM]) -> None:
    """SIGTERM to the engine (systemd's KillMode=control-group signals the whole group) is
    ignored: its requests finish and it exits when shut down, with code 0."""
    engine = engines[2]
    deaths: list[str] = []
    engine.on_engine_death = deaths.append
    proc = engine._handle.proc
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    gen = engine.generate("hello", params, "x")
    await gen.__anext__()
    os.kill(proc.pid, signal.SIGTERM)
    outs = await asyncio.wait_for(collect(gen), 10)
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 100
    await asyncio.sleep(0.2)
    await engine.check_health()
    assert engine.is_running and not engine.died_unexpectedly
    gen = engine.generate([5, 6], LONG, "in-flight")
    await gen.__anext__()
    engine.shutdown()
    engine.shutdown()
    assert not proc.is_alive() and proc.exitcode == 0
    assert engine._handle.tmpdir is None and engine._handle.input_addr.startswith("ipc://@")
    assert not engine.is_running and not engine.died_unexpectedly and not deaths
    with pytest.raises(EngineDeadError):
        await collect(gen)
    with pytest.raises(EngineDeadError):
        await engine.check_health()


async def test_engine_loop_error_is_fatal(engines: list[AsyncLLM]) -> None:
    engine = engines[3]
    gen = engine.generate([5, 6], LONG, "in-flight")
    await gen.__anext__()
    engine._handle.send(AbortRequests(None))  # type: ignore[arg-type]  # the engine loop raises
    with pytest.raises(EngineDeadError, match="TypeError"):
        await asyncio.wait_for(collect(gen), 5)
    assert not engine.is_running and engine.died_unexpectedly
    engine._handle.proc.join(5)
    assert engine._handle.proc.exitcode == 1


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # zombie: exited
    except FileNotFoundError:
        return True


async def test_engine_exits_with_its_parent(
    engines: list[AsyncLLM], orphan_parent: asyncio.subprocess.Process
) -> None:
    assert orphan_parent.stdout is not None
    line = (await asyncio.wait_for(orphan_parent.stdout.readline(), 60)).decode().split()
    engine_pid, output_addr = int(line[0]), line[1]
    assert not _process_gone(engine_pid)
    orphan_parent.kill()
    await orphan_parent.wait()
    deadline = asyncio.get_running_loop().time() + 3
    while not _process_gone(engine_pid):
        assert asyncio.get_running_loop().time() < deadline, "the engine outlived its parent"
        await asyncio.sleep(0.05)
    # Nothing is left behind: the sockets were abstract (no files), and are gone now.
    base = output_addr.removeprefix("ipc://").removesuffix("-output")
    assert base.startswith(f"@pagedllm-{orphan_parent.pid}-"), output_addr
    assert not list(Path(tempfile.gettempdir()).glob(f"pagedllm-{orphan_parent.pid}-*"))
    assert base not in Path("/proc/net/unix").read_text()


async def test_heartbeats_while_idle(llm: AsyncLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    await wait_idle(llm)
    await llm.start_monitoring()
    received: list[Any] = []
    messages = llm._handle.messages

    def recording() -> Iterator[Any]:
        for msg in messages():
            received.append(msg)
            yield msg

    monkeypatch.setattr(llm._handle, "messages", recording)
    first = llm.last_contact
    await asyncio.sleep(1.3)
    assert len(received) >= 2 and all(isinstance(m, Heartbeat) for m in received), received
    assert all(m.stats is None for m in received)  # the stats did not change
    assert llm.last_contact > first + 0.4
    assert llm.seconds_since_contact() < 0.8 and not llm.is_wedged(1.0)
    await llm.check_health()


async def _ended(
    llm: AsyncLLM, before: EngineStats, *, aborted: int | None, ended: int
) -> EngineStats:
    """Stats once the engine is idle with no unfinished request and, within 20 s (a loaded
    machine), ``ended`` more requests finished, ``aborted`` of them by an abort (None: any;
    an abort is counted when its output leaves a step)."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        after = await wait_idle(llm)
        num_aborted = after.requests_finished_abort - before.requests_finished_abort
        num_ended = num_aborted + after.requests_finished_length - before.requests_finished_length
        if after.num_unfinished_requests == 0 and num_ended >= ended:
            assert num_ended == ended and aborted in (None, num_aborted), after
            return after
        assert asyncio.get_running_loop().time() < deadline, (num_aborted, num_ended, after)
        await asyncio.sleep(0.02)


async def test_request_timeout(llm: AsyncLLM) -> None:
    before = await wait_idle(llm)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(RequestTimeoutError, match="0.3 s"):
        await collect(llm.generate([5, 6, 10], LONG, "too-slow", request_timeout_s=0.3))
    assert 0.3 <= loop.time() - t0 < 1.0
    after = await _ended(llm, before, aborted=1, ended=1)  # aborted in the engine, KV freed
    # A slow consumer's time counts too (the outputs it has not read are waiting for it).
    gen = llm.generate([5, 6, 11], LONG, "slow-reader", request_timeout_s=0.3)
    await gen.__anext__()
    await asyncio.sleep(0.35)
    with pytest.raises(RequestTimeoutError):
        await gen.__anext__()
    # Aborted, unless the engine happened to finish it while the reader slept.
    await _ended(llm, after, aborted=None, ended=1)
    # Within its timeout a request is unaffected; the timeout must be positive.
    quick = await collect(
        llm.generate([5], SamplingParams(max_tokens=3), "quick", request_timeout_s=5)
    )
    assert quick[-1].finished
    with pytest.raises(ValueError, match="request_timeout_s"):
        await collect(llm.generate([5], SamplingParams(max_tokens=3), "zero", request_timeout_s=0))


class _Evil:
    """Unpickling this creates ``path``: proof that a frame was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


@contextlib.contextmanager
def _pusher(addr: str) -> Iterator[zmq.Socket]:
    """Another local process's view: a PUSH socket connected to one of the engine's sockets."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(addr)
    try:
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


async def test_forged_frames_are_not_unpickled(llm: AsyncLLM, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    forged = [pickle.dumps(_Evil(marker)), encode(_Evil(marker), b"wrong key" * 4)]
    key = llm._handle.key
    # To the engine: the forged frames, then a signed abort (frames of one pipe arrive in order,
    # so once the abort has taken effect the forged ones were read).
    gen = llm.generate([5, 6, 12], LONG, "forged")
    await gen.__anext__()
    engine_id = llm._streams["forged"].engine_id
    with _pusher(llm._handle.input_addr) as sock:
        for frame in [*forged, encode(AbortRequests([engine_id]), key)]:
            sock.send(frame)
        outs = await asyncio.wait_for(collect(gen), 5)
    assert outs[-1].outputs[0].finish_reason == "abort"
    # To the API process: the same, then a signed heartbeat with a probe value in its stats.
    stats = await wait_idle(llm)
    probe = dataclasses.replace(stats, num_steps_total=-1)
    with _pusher(llm._handle.output_addr) as sock:
        for frame in [*forged, encode(Heartbeat(probe), key)]:
            sock.send(frame)
        deadline = asyncio.get_running_loop().time() + 5
        while (await llm.get_stats()).num_steps_total != -1:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        sock.send(encode(Heartbeat(stats), key))  # put the real stats back
    assert not marker.exists()
    assert llm._handle._out.num_rejected >= 2
    await llm.check_health()
    assert (await collect(llm.generate([5], SamplingParams(max_tokens=2), "after-forged")))[-1]


def _resume(proc: BaseProcess) -> None:
    """SIGCONT, so that no stopped process outlives a test."""
    with contextlib.suppress(ProcessLookupError):
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGCONT)


async def test_stopped_engine(engines: list[AsyncLLM]) -> None:
    """SIGSTOP: unresponsive after health_timeout_s, busy or idle (no heartbeats either), and
    healthy again after SIGCONT (without a stall timeout nothing is declared dead)."""
    engine = engines[4]
    engine.health_timeout_s = 0.8
    proc = engine._handle.proc
    await engine.check_health()
    gen = engine.generate([5, 6, 13], LONG, "paused")
    await gen.__anext__()
    for busy in (True, False):
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            waited = await _until(lambda: engine.is_wedged(0.8), 3)
            assert waited > 0.3
            with pytest.raises(EngineUnresponsiveError, match="health_timeout_s=0.8"):
                await engine.check_health()
            assert engine.is_running and not engine.died_unexpectedly
        finally:
            _resume(proc)
        if busy:  # it carries on where it stopped
            outs = await asyncio.wait_for(collect(gen), 10)
            assert len(outs[-1].outputs[0].token_ids) == 600
        await _until(lambda: not engine.is_wedged(0.8), 2)
        await engine.check_health()
    assert (await collect(engine.generate([5], SamplingParams(max_tokens=2), "resumed")))[-1]


async def test_stalled_engine_is_killed(engines: list[AsyncLLM]) -> None:
    """With engine_stall_timeout_s, a silent engine is killed and in-flight requests fail."""
    engine = engines[4]
    deaths: list[str] = []
    engine.on_engine_death = deaths.append
    engine.engine_stall_timeout_s = 0.6
    proc = engine._handle.proc
    gen = engine.generate([5, 6, 14], LONG, "stalled")
    await gen.__anext__()
    loop = asyncio.get_running_loop()
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        t0 = loop.time()
        with pytest.raises(EngineDeadError, match="No response from the engine process"):
            await asyncio.wait_for(collect(gen), 5)
        assert 0.4 < loop.time() - t0 < 2.0
        proc.join(2)
        assert proc.exitcode == -signal.SIGKILL
        assert engine.died_unexpectedly and not engine.is_running
        assert len(deaths) == 1 and "engine_stall_timeout_s=0.6" in deaths[0]
        with pytest.raises(EngineDeadError):
            await engine.check_health()
    finally:
        _resume(proc)
        engine.shutdown()
    assert engine.died_unexpectedly and len(deaths) == 1
