"""Server lifecycle: 503 when the waiting queue is full or a request waits past
``--queue-timeout``, graceful SIGTERM drain (in-flight
request completes, new connections refused, exit code 0), and a dead engine process (503 on
/health and on requests, an error event in open streams, exit status 1)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.entrypoints.openai.conftest import MODEL_NAME, ServerProc

COMPLETIONS = "/v1/completions"


def _body(max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "prompt": "def",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }


@pytest.fixture(scope="module")
def drain(servers: dict[str, ServerProc]) -> ServerProc:
    return servers["drain"]


@pytest.fixture(scope="module")
def doomed(servers: dict[str, ServerProc]) -> ServerProc:
    return servers["doomed"]


class _Blocker(threading.Thread):
    """A streamed request that holds the only batch slot (``--max-num-seqs 1``) until done."""

    def __init__(self, server: ServerProc, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url = server.base_url + COMPLETIONS
        self.body = _body(max_tokens, stream=True)
        self.started = threading.Event()
        self.events: list[str] = []

    def run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    self.events.append(line)
                    self.started.set()
        self.started.set()

    def usage(self) -> dict[str, Any]:
        self.join(60)
        assert self.events[-1] == "data: [DONE]"
        return dict(json.loads(self.events[-2][6:])["usage"])


def _wait_until_waiting(server: ServerProc, n: int, timeout: float = 20.0) -> None:
    """Poll /metrics until the engine reports ``n`` waiting requests."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in httpx.get(server.base_url + "/metrics").text.splitlines():
            if line.startswith("pagedllm:num_requests_waiting") and float(line.split()[-1]) >= n:
                return
        time.sleep(0.02)
    raise AssertionError(f"{n} waiting request(s) never showed in /metrics")


def test_queue_full_is_503(drain: ServerProc) -> None:
    url = drain.base_url + COMPLETIONS
    blocker = _Blocker(drain, 900)  # about 2 s: it holds the only seat while we look
    blocker.start()
    assert blocker.started.wait(30)  # it is running: the next request has to wait
    waiting: list[httpx.Response] = []
    second = threading.Thread(target=lambda: waiting.append(httpx.post(url, json=_body(3))))
    second.start()
    _wait_until_waiting(drain, 1)  # the second request is queued in the engine
    third = httpx.post(url, json=_body(3, stream=True), timeout=60)  # --max-waiting-requests 1
    assert third.status_code == 503, third.text
    err = third.json()["error"]
    assert err["code"] == "queue_full" and err["type"] == "service_unavailable"
    assert third.headers["Retry-After"] == "1"
    second.join(60)
    if waiting[0].status_code == 200:  # else it waited past --queue-timeout on a slow machine
        assert waiting[0].json()["usage"]["completion_tokens"] == 3
    else:
        assert waiting[0].json()["error"]["code"] == "queue_timeout"
    assert blocker.usage()["completion_tokens"] == 900


def test_queue_timeout_is_503(drain: ServerProc) -> None:
    blocker = _Blocker(drain, 1000)  # about 2 s even on an idle machine
    blocker.start()
    assert blocker.started.wait(30)
    late = httpx.post(drain.base_url + COMPLETIONS, json=_body(3), timeout=60)
    assert late.status_code == 503, late.text  # it waited past --queue-timeout 0.5
    assert late.json()["error"]["code"] == "queue_timeout"
    assert blocker.usage()["completion_tokens"] == 1000


def test_sigterm_drains_in_flight_request(drain: ServerProc) -> None:
    url = drain.base_url + COMPLETIONS
    events: list[str] = []
    with httpx.stream("POST", url, json=_body(800, stream=True), timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)
        events.append(next(lines))
        drain.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # the listener is closed while draining
            httpx.get(drain.base_url + "/health", timeout=2)
        events.extend(lines)
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][6:])["usage"]
    assert usage["completion_tokens"] == 800
    assert drain.proc.wait(30) == 0
    assert "request_finished" in drain.log()


def _engine_pid(server: ServerProc) -> int:
    for pid in server.engine_pids():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spawn_main" in cmdline:
            return pid
    raise AssertionError("engine process not found")


def test_dead_engine_is_503(doomed: ServerProc) -> None:
    url = doomed.base_url + COMPLETIONS
    events: list[str] = []
    with httpx.stream("POST", url, json=_body(480, stream=True), timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)
        events.append(next(lines))
        os.kill(_engine_pid(doomed), signal.SIGKILL)
        events.extend(lines)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "engine_dead"
    health = httpx.get(doomed.base_url + "/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
    r2 = httpx.post(url, json=_body(3))
    assert r2.status_code == 503 and r2.json()["error"]["code"] == "engine_dead"
    assert httpx.get(doomed.base_url + "/metrics").status_code == 200
    doomed.proc.send_signal(signal.SIGTERM)
    assert doomed.proc.wait(30) == 1  # the engine died before shutdown was asked for
