"""Regression tests for the connection- and process-level hardening findings: slow clients are
dropped, requests have a server-side time bound, JWT and API-key auth with per-subject rate
limits, a wedged (SIGSTOPped) engine turns ``/health`` 503, SIGTERM to the whole process group
drains, and ``--exit-on-engine-death`` stops the server with a non-zero status."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.entrypoints.openai.conftest import (
    GUARDED_KEYS,
    GUARDED_RPM,
    JWT_AUDIENCE,
    JWT_SECRET,
    MODEL_NAME,
    ServerProc,
    launch,
)

COMPLETIONS = "/v1/completions"


def _token(sub: str, *, aud: str = JWT_AUDIENCE, exp_in: float = 300, key: str = JWT_SECRET) -> str:
    now = int(time.time())
    claims = {"sub": sub, "aud": aud, "iat": now, "exp": now + int(exp_in)}
    return jwt.encode(claims, key, algorithm="HS256")


def _auth(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def _engine_pid(server: ServerProc) -> int:
    for pid in server.engine_pids():
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError("engine process not found")


@pytest.fixture(scope="module")
def guarded(servers: dict[str, ServerProc]) -> ServerProc:
    return servers["guarded"]


# ---- 7. slow clients -----------------------------------------------------------------------
def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_partial_headers_are_dropped(guarded: ServerProc) -> None:
    addr = ("127.0.0.1", guarded.port)
    with socket.create_connection(addr) as slow, socket.create_connection(addr) as silent:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finishes
        assert _closed_within(slow, 5.0)  # --header-read-timeout 1
        assert _closed_within(silent, 5.0)
    assert httpx.get(guarded.base_url + "/health").status_code == 200


def test_unread_body_closes_the_connection(guarded: ServerProc) -> None:
    """A GET that announces a body it then trickles in is answered, then disconnected."""
    head = "GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", guarded.port)) as s:
        s.sendall(head.encode() + b"x")
        s.settimeout(5.0)
        reply = s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200"), reply
        assert httpx.head(guarded.base_url + "/health").status_code == 200  # HEAD probes too
        s.sendall(b"y")  # more body bytes, as a slowloris client would send
        assert _closed_within(s, 5.0)


def test_slow_body_is_408(guarded: ServerProc) -> None:
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {GUARDED_KEYS[0]}\r\nContent-Length: 100\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", guarded.port)) as s:
        s.sendall(head.encode() + b'{"prompt": ')
        s.settimeout(5.0)
        chunks = []
        while chunk := s.recv(65536):  # until the server closes the connection
            chunks.append(chunk)
        reply = b"".join(chunks).decode()
    assert reply.startswith("HTTP/1.1 408"), reply
    assert '"code":"request_timeout"' in reply.replace(" ", "")


# ---- 4. server-side request bound -----------------------------------------------------------
def test_request_timeout(guarded: ServerProc) -> None:
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "prompt": ["def"] * 8,  # 8 x 480 tokens on 2 seats: far longer than 1 s
        "max_tokens": 480,
        "ignore_eos": True,
    }
    headers = _auth(_token("timeout-test"))
    r = httpx.post(guarded.base_url + COMPLETIONS, json=body, headers=headers, timeout=60)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "request_timeout"
    body["stream"] = True
    with httpx.stream(
        "POST", guarded.base_url + COMPLETIONS, json=body, headers=headers, timeout=60
    ) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["code"] == "request_timeout"
    stats = httpx.get(guarded.base_url + "/metrics", headers=headers).text
    assert "pagedllm" in stats or "vllm" in stats


# ---- 10. authentication and rate limits ----------------------------------------------------
def test_api_keys_and_jwt(guarded: ServerProc) -> None:
    url = guarded.base_url + "/v1/models"
    for key in GUARDED_KEYS:
        assert httpx.get(url, headers=_auth(key)).status_code == 200
    assert httpx.get(url, headers=_auth(_token("alice"))).status_code == 200
    cases = {
        "expired": _token("bob", exp_in=-120),
        "audience": _token("bob", aud="someone-else"),
        "signature": _token("bob", key="another-secret-0123456789-0123456789"),
        "garbage": "not-a-key",
    }
    for name, credential in cases.items():
        r = httpx.get(url, headers=_auth(credential))
        assert r.status_code == 401, (name, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert "expired" in httpx.get(url, headers=_auth(cases["expired"])).json()["error"]["message"]
    assert httpx.get(guarded.base_url + "/health").status_code == 200  # open


def test_rate_limit_per_subject(guarded: ServerProc) -> None:
    url = guarded.base_url + "/v1/models"
    carol, dave = _auth(_token("carol")), _auth(_token("dave"))
    for _ in range(GUARDED_RPM):
        assert httpx.get(url, headers=carol).status_code == 200
    r = httpx.get(url, headers=carol)
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
    assert int(r.headers["Retry-After"]) >= 1
    assert httpx.get(url, headers=dave).status_code == 200  # others are not affected


# ---- 4. wedged engine, 3. process-group SIGTERM --------------------------------------------
def _wait_health(server: ServerProc, status: int, within: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if httpx.get(server.base_url + "/health", timeout=5).status_code == status:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"/health did not turn {status} within {within} s")


def test_wedged_engine_then_group_sigterm_drains(servers: dict[str, ServerProc]) -> None:
    wedged = servers["wedged"]
    pid = _engine_pid(wedged)
    os.kill(pid, signal.SIGSTOP)
    try:
        _wait_health(wedged, 503, 5.0)  # --engine-health-timeout 1
        t0 = time.monotonic()  # new requests are refused at once instead of queueing
        r = httpx.post(wedged.base_url + COMPLETIONS, json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert time.monotonic() - t0 < 2.0
    finally:
        os.kill(pid, signal.SIGCONT)
    _wait_health(wedged, 200, 5.0)

    body = {"model": MODEL_NAME, "prompt": "def", "max_tokens": 400, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    events: list[str] = []
    with httpx.stream("POST", wedged.base_url + COMPLETIONS, json=body, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)
        events.append(next(lines))
        os.killpg(wedged.proc.pid, signal.SIGTERM)  # as systemd's KillMode=control-group
        events.extend(lines)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 400
    assert wedged.proc.wait(30) == 0


# ---- 3. exit on engine death ---------------------------------------------------------------
def test_exit_on_engine_death(llama_dir: Path, tmp_path: Path) -> None:
    server = launch("fragile", llama_dir, tmp_path, "--exit-on-engine-death")
    try:
        server.wait_ready(time.monotonic() + 120)
        os.kill(_engine_pid(server), signal.SIGKILL)
        assert server.proc.wait(30) == 1
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)
