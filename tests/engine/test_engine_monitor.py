"""``EngineMonitor`` against a fake engine handle (no process, no sockets): how each kind of
death is noticed and announced exactly once, silence versus health and stall timeouts, and
``stop()`` from another thread while the reader's loop runs."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from pagedllm.engine.engine_monitor import EngineMonitor, check_timeout
from pagedllm.engine.errors import EngineDeadError, EngineUnresponsiveError
from pagedllm.engine.messages import EngineError, Heartbeat


class _FakeProcess:
    def __init__(self) -> None:
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        return self.exitcode is None


class _FakeHandle:
    """``EngineProcess``'s surface used by ``EngineMonitor``: an inbox instead of a socket."""

    def __init__(self) -> None:
        self.proc = _FakeProcess()
        self.closed = False
        self.inbox: list[Any] = []
        self.read_error: Exception | None = None
        self.kills = 0

    def messages(self) -> Iterator[Any]:
        while self.inbox:
            yield self.inbox.pop(0)

    async def wait_readable(self, timeout_ms: int) -> bool:
        await asyncio.sleep(min(timeout_ms, 10) / 1000)
        if self.read_error is not None:
            raise self.read_error
        return bool(self.inbox)

    def kill(self) -> None:
        self.kills += 1
        self.proc.exitcode = -9


class _Recorder:
    def __init__(self, stall_timeout_s: float | None = None) -> None:
        self.handle = _FakeHandle()
        self.dispatched: list[Any] = []
        self.failed: list[tuple[str, int]] = []  # (reason, thread id)
        self.deaths: list[str] = []
        self.monitor = EngineMonitor(
            self.handle,  # type: ignore[arg-type]
            self.dispatched.append,
            lambda reason: self.failed.append((reason, threading.get_ident())),
            engine_stall_timeout_s=stall_timeout_s,
        )
        self.monitor.on_engine_death = self.deaths.append


async def _until_dead(monitor: EngineMonitor, timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while monitor.dead is None:
        assert loop.time() < deadline, "the monitor did not notice"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_engine_error_is_fatal() -> None:
    r = _Recorder()
    r.monitor.start()
    r.handle.inbox += [Heartbeat(), EngineError("TypeError: boom", "tb"), Heartbeat()]
    await _until_dead(r.monitor)
    assert r.dispatched == [Heartbeat()]  # nothing after the error is dispatched
    assert r.failed == [("The engine process failed: TypeError: boom", threading.get_ident())]
    assert r.deaths == [r.failed[0][0]]
    assert r.monitor.died_unexpectedly and not r.monitor.is_running
    with pytest.raises(EngineDeadError, match="boom"):
        r.monitor.raise_if_dead()
    r.monitor.mark_dead("again")  # the first reason wins; nothing is announced twice
    r.monitor.stop()
    assert len(r.failed) == 1 and len(r.deaths) == 1 and r.monitor.died_unexpectedly


@pytest.mark.asyncio
async def test_process_exit_is_noticed() -> None:
    r = _Recorder()
    r.monitor.start()
    r.handle.proc.exitcode = 3
    await _until_dead(r.monitor)
    assert r.deaths == ["The engine process died unexpectedly (exit code 3)."]
    # Without a reader, a request notices too.
    r2 = _Recorder()
    r2.handle.proc.exitcode = -9
    with pytest.raises(EngineDeadError, match="exit code -9"):
        r2.monitor.raise_if_dead()


@pytest.mark.asyncio
async def test_silence_health_and_stall() -> None:
    r = _Recorder()
    r.monitor.start()
    await asyncio.sleep(0.25)
    assert r.monitor.is_wedged(0.2) and r.monitor.is_running
    with pytest.raises(EngineUnresponsiveError, match="health_timeout_s=0.2"):
        r.monitor.check_health(0.2)
    r.monitor.check_health(None)  # no limit: never unresponsive
    r.handle.inbox.append(Heartbeat())  # it recovers
    r.monitor.check_health(0.2)
    assert r.monitor.seconds_since_contact() < 0.1 and r.monitor.dead is None
    r.monitor.stop()

    stalled = _Recorder(stall_timeout_s=0.2)
    stalled.monitor.start()
    await _until_dead(stalled.monitor)
    assert stalled.handle.kills == 1
    assert "engine_stall_timeout_s=0.2" in stalled.deaths[0]
    assert stalled.monitor.died_unexpectedly


@pytest.mark.asyncio
async def test_stop_from_another_thread() -> None:
    """``shutdown()`` from another thread: requests fail on the loop's thread, the reader
    stops, and it is no death to report."""
    r = _Recorder()
    r.monitor.start()
    reader = r.monitor._reader
    assert reader is not None
    await asyncio.sleep(0.05)
    await asyncio.to_thread(r.monitor.stop)
    await asyncio.sleep(0.05)
    assert r.failed == [("The engine was shut down.", threading.get_ident())]
    assert reader.done() and not r.deaths
    assert not r.monitor.died_unexpectedly and r.monitor.dead_expected
    r.monitor.start()  # a no-op once dead
    assert r.monitor._reader is None


@pytest.mark.asyncio
async def test_stop_reads_a_last_error() -> None:
    """An engine that failed before ``stop()`` (nobody was reading) still died unexpectedly."""
    r = _Recorder()
    r.handle.inbox.append(EngineError("OOM"))
    r.handle.proc.exitcode = 1
    r.monitor.stop()
    assert r.monitor.died_unexpectedly and r.deaths == ["The engine process failed: OOM"]


@pytest.mark.asyncio
async def test_reader_failure_fails_requests(caplog: pytest.LogCaptureFixture) -> None:
    r = _Recorder()
    r.handle.read_error = RuntimeError("socket trouble")
    r.monitor.on_engine_death = lambda reason: 1 / 0  # a failing hook is logged, not raised
    with caplog.at_level(logging.ERROR):
        r.monitor.start()
        await _until_dead(r.monitor)
    assert "socket trouble" in r.failed[0][0] and r.monitor.died_unexpectedly
    assert "on_engine_death raised" in caplog.text


def test_check_timeout() -> None:
    assert check_timeout("x", None) is None and check_timeout("x", 0.5) == 0.5
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="x must be > 0"):
            check_timeout("x", bad)
