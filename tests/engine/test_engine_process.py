"""The engine process's plumbing without a model: signed frames, the idle heartbeat of
``EngineCore.serve`` (driven with a fake ``LLMEngine`` over inproc sockets), socket addresses
and stale-dir clean-up, and ``EngineProcess.close()`` on a process that ignores SIGTERM."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import threading
import time
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from pagedllm import EngineConfig
from pagedllm.engine import core_proc
from pagedllm.engine.core_proc import EngineCore
from pagedllm.engine.engine_process import EngineProcess, remove_stale_dirs
from pagedllm.engine.framing import BadMessageError, Channel, decode, encode, new_key
from pagedllm.engine.messages import AbortRequests, AddRequest, EngineOutputs, Heartbeat, Shutdown
from pagedllm.engine.stats import SchedulerStats
from pagedllm.sampling_params import SamplingParams


class _Evil:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


def test_frames_are_signed(tmp_path: Path) -> None:
    key = new_key()
    msg = AbortRequests(["a", "b"])
    assert decode(encode(msg, key), key) == msg
    marker = tmp_path / "pwned"
    frame = encode(_Evil(marker), key)
    forged = [
        pickle.dumps(_Evil(marker)),  # unsigned
        encode(_Evil(marker), new_key()),  # another key
        frame[:-1] + bytes([frame[-1] ^ 1]),  # tampered payload
        frame[:10],  # too short
        b"",
    ]
    for data in forged:
        with pytest.raises(BadMessageError):
            decode(data, key)
    assert not marker.exists()  # nothing forged was unpickled


class _FakeEngine:
    """``LLMEngine``'s surface used by EngineCore: each request takes 5 steps, an abort
    changes the stats (it counts as a preemption here: any field would do)."""

    def __init__(self) -> None:
        self.steps_left = 0
        self.aborts = 0
        self.output_processor = SimpleNamespace(states={})

    def add_request(self, request_id: str, *args: Any, **kwargs: Any) -> None:
        self.steps_left = 5

    def abort_request(self, request_ids: list[str]) -> None:
        self.aborts += 1

    def has_unfinished_requests(self) -> bool:
        return self.steps_left > 0

    def get_num_unfinished_requests(self) -> int:
        return int(self.steps_left > 0)

    def has_queued_work(self) -> bool:
        return self.steps_left > 0

    def take_request_errors(self) -> list[tuple[str, ValueError]]:
        return []

    def step(self) -> list[Any]:
        self.steps_left -= 1
        time.sleep(0.01)
        return []

    def stats(self) -> SchedulerStats:
        busy = int(self.steps_left > 0)
        return SchedulerStats(
            num_running=busy,
            num_waiting=0,
            kv_cache_usage=0.0,
            num_kv_blocks=8,
            num_unfinished_requests=busy,
            num_preemptions=self.aborts,
            prefix_cache_queries=0,
            prefix_cache_hits=0,
        )


def _recv_all(sock: zmq.Socket, key: bytes, seconds: float) -> list[tuple[float, Any]]:
    """(arrival time, message) for everything received within ``seconds``."""
    got: list[tuple[float, Any]] = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1, zmq.POLLIN):
            got.append((time.monotonic(), decode(sock.recv(), key)))
    return got


def test_idle_engine_sends_heartbeats() -> None:
    key = new_key()
    ctx = zmq.Context()
    to_engine, engine_in = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    engine_out, from_engine = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    engine_in.bind("inproc://in")
    to_engine.connect("inproc://in")
    from_engine.bind("inproc://out")
    engine_out.connect("inproc://out")
    core = EngineCore(_FakeEngine(), Channel(engine_out, key))  # type: ignore[arg-type]
    core.send(Heartbeat(core.stats()))  # as EngineReady would: the stats as last sent
    worker = threading.Thread(target=core.serve, args=(Channel(engine_in, key), os.getppid()))
    t0 = time.monotonic()
    worker.start()
    send = Channel(to_engine, key)
    try:
        # Idle: a bare heartbeat every HEARTBEAT_INTERVAL_S, nothing else.
        interval = core_proc.HEARTBEAT_INTERVAL_S
        (_, ready), *idle = _recv_all(from_engine, key, 3.6 * interval)
        assert ready.stats is not None
        assert [type(m) for _, m in idle] == [Heartbeat] * 3
        assert all(m.stats is None for _, m in idle)
        times = [t0] + [t for t, _ in idle]
        assert all(interval * 0.9 < b - a < interval * 1.5 for a, b in pairwise(times)), times
        # Busy: one EngineOutputs per step and no heartbeats, then heartbeats again.
        params = SamplingParams(max_tokens=5)
        send.send(AddRequest("r", [1, 2], params, time.monotonic()))
        busy = _recv_all(from_engine, key, 0.3 + interval)
        kinds = [type(m) for _, m in busy]
        assert kinds[:5] == [EngineOutputs] * 5 and kinds[5:] == [Heartbeat], kinds
        assert busy[5][0] - busy[4][0] > interval * 0.9  # due one interval after the last step
        # Stats that change while idle (an abort) go out at once.
        t1 = time.monotonic()
        send.send(AbortRequests(["gone"]))
        (t2, msg), *_ = _recv_all(from_engine, key, 0.2)
        assert (
            isinstance(msg, Heartbeat) and msg.stats is not None and msg.stats.num_preemptions == 1
        )
        assert t2 - t1 < 0.1
    finally:
        send.send(Shutdown())
        worker.join(2)
        for sock in (to_engine, engine_in, engine_out, from_engine):
            sock.close(linger=0)
        ctx.term()
    assert not worker.is_alive()


def test_remove_stale_dirs(tmp_path: Path) -> None:
    dead_pid = _exited_pid()
    stale = tmp_path / f"pagedllm-{dead_pid}-abc"
    live = tmp_path / f"pagedllm-{os.getpid()}-def"
    other = tmp_path / "pagedllm-sched-ghi"
    stale_file = tmp_path / f"pagedllm-{dead_pid}-file"
    for d in (stale, live, other):
        (d / "sub").mkdir(parents=True)
    stale_file.write_text("")
    remove_stale_dirs(str(tmp_path))
    assert not stale.exists()
    assert live.exists() and other.exists() and stale_file.exists()


def _exited_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def config(llama_dir: Path) -> EngineConfig:
    return EngineConfig(model=str(llama_dir), num_gpu_blocks=8, block_size=16)


def test_socket_addresses(config: EngineConfig) -> None:
    handle = EngineProcess(config)  # not started
    assert handle.tmpdir is None
    assert handle.input_addr.startswith(f"ipc://@pagedllm-{os.getpid()}-")
    assert handle.output_addr.startswith(f"ipc://@pagedllm-{os.getpid()}-")
    handle.close()
    fallback = EngineProcess(config, abstract=False)
    assert fallback.tmpdir is not None and os.path.isdir(fallback.tmpdir)
    assert Path(fallback.tmpdir).name.startswith(f"pagedllm-{os.getpid()}-")
    assert oct(os.stat(fallback.tmpdir).st_mode & 0o777) == oct(0o700)
    assert fallback.output_addr == f"ipc://{fallback.tmpdir}/output"
    fallback.close()
    assert not os.path.exists(fallback.tmpdir)


def _ignore_sigterm_and_wait() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


def test_close_kills_an_engine_that_does_not_stop(config: EngineConfig) -> None:
    """Like a stuck engine: it never reads Shutdown and ignores SIGTERM; close() SIGKILLs it
    once ``shutdown_grace_s`` is up."""
    handle = EngineProcess(config)
    handle.proc = multiprocessing.get_context("fork").Process(target=_ignore_sigterm_and_wait)
    handle.proc.start()
    try:
        time.sleep(0.2)  # it has installed its handler
        os.kill(handle.proc.pid, signal.SIGTERM)
        time.sleep(0.1)
        assert handle.proc.is_alive()
        handle.shutdown_grace_s = 0.3
        t0 = time.monotonic()
        handle.close()
        assert 0.3 <= time.monotonic() - t0 < 1.5
        assert handle.proc.exitcode == -signal.SIGKILL
        handle.close()  # idempotent
    finally:
        if handle.proc.is_alive():
            handle.proc.kill()
